from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="mygpt",
    version="0.1.0",
    description="A small, readable and fast PyTorch GPT: training, sampling, GPT-2 BPE and time-weighted attention",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["mygpt", "mygpt.*"]),
    package_data={"mygpt": ["vocab/gpt2/*", "matvec.cpp", "decode.cpp"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "tqdm", "regex", "requests"],
    extras_require={
        "hf": ["transformers"],                      # GPT.from_pretrained
        "data": ["datasets>=4", "pyarrow"],             # prepare_corpus from Parquet files or a hub dataset
        "export": ["safetensors", "gguf"],           # mygpt export --format hf|gguf
        "plot": ["matplotlib"],                      # loss.png
        "evals": ["pyarrow"],                        # mygpt eval --task on .parquet/.arrow rows
        "gpu": ["triton>=3.2; sys_platform == 'linux'"],  # the fused time-weighted attention kernel
        "projects": ["scikit-learn", "pillow"],      # image-gpt
        "test": ["transformers", "tiktoken", "tokenizers", "hypothesis", "scikit-learn", "pillow",
                 "datasets>=4", "pyarrow", "safetensors", "gguf", "matplotlib"],  # the kernel's tests: [gpu] too
    },
    entry_points={"console_scripts": ["mygpt = mygpt.cli:main"]},
)
