import importlib.util
import json
import os
import tempfile
import unittest

import numpy as np
import torch

from mygpt import GPT, get_encoder, train_bpe
from mygpt.checkpoint import save_checkpoint
from mygpt.export import export_architecture, export_gguf, export_hf
from mygpt.model import RMS_EPS, _rms_norm
from mygpt.quantize import quantize
from mygpt.recipes import apply_recipe
from mygpt.rotary import apply_rotary, rotary_angles
from mygpt.utils import CfgNode
from tests.helpers import TempDirTest

try:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    transformers = None
try:
    import gguf
except ImportError:
    gguf = None

TEXT = "Hello world! It's 2024: naïve café, 日本語, emoji 🙂 and <|endoftext|> and\n\tcode = f(x) ** 2"


def small_config(**kw):
    c = GPT.get_default_config()
    c.n_layer, c.n_head, c.n_embd = 2, 4, 32
    c.vocab_size, c.block_size = 50257, 64
    c.merge_from_dict(kw)
    return c


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(small_config(**kw)).eval()
    with torch.no_grad():  # biases and LayerNorms away from 0 and 1, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith("ln_1.weight") else 0.0, std=0.1)
    return model


LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)  # + qk_norm=True: Qwen3
# Llama and Qwen3, with and without grouped-query attention, tied and untied
LLAMAS = [("Llama", dict()), ("Llama", dict(n_kv_head=2, tie_weights=False, zero_init=True)),
          ("Qwen3", dict(qk_norm=True)),
          ("Qwen3", dict(qk_norm=True, n_kv_head=1, tie_weights=False, rope_base=500.0, mlp_hidden=40))]


def llama_model(seed=0, **kw):
    """A Llama-shaped model (LLAMA + kw) with a 512-token vocabulary and weights of unit gain: q and k large
    enough that attention is far from uniform, so that a misplaced row or rotation shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(small_config(vocab_size=512, **dict(LLAMA, **kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    return model


REFUSED = [(dict(time_weighting="full"), "time_weighting"), (dict(time_weighting="circulant"), "time_weighting"),
           (dict(token_shift=True), "token_shift"), (dict(pos_emb=False), "pos_emb"), (dict(bias=False), "bias"),
           # a modern switch alone: GPT-2 is the nearest
           (dict(pos_emb="rope"), "the nearest, GPT-2, cannot represent pos_emb='rope' \\(GPT-2 has pos_emb='learned'"),
           (dict(norm="rmsnorm"), "norm='rmsnorm'"), (dict(qk_norm=True), "qk_norm=True"),
           (dict(mlp="swiglu"), "mlp='swiglu'"), (dict(n_kv_head=2), "n_kv_head=2"), (dict(mlp_hidden=64), "mlp_hidden"),
           # one switch away from Llama or Qwen3
           (dict(LLAMA, mlp="relu2"), "the nearest, Llama, cannot represent mlp='relu2' \\(Llama has mlp='swiglu'\\)"),
           (dict(LLAMA, mlp="gelu"), "mlp='gelu'"), (dict(LLAMA, norm="layernorm"), "norm='layernorm'"),
           (dict(LLAMA, bias=True), "bias=True \\(Llama has bias=False"), (dict(LLAMA, pos_emb=None), "pos_emb=None"),
           (dict(LLAMA, qk_norm=True, logit_softcap=30.0), "the nearest, Qwen3, .*logit_softcap=30.0 \\(none of"),
           (dict(LLAMA, embd_norm=True), "embd_norm=True \\(none of GPT-2, Llama and Qwen3 normalises"),
           (dict(LLAMA, token_shift=True), "token_shift=True"), (dict(LLAMA, time_weighting="full"), "time_weighting")]


@unittest.skipIf(transformers is None, "needs transformers (pip install 'mygpt[test]')")
class TestExportHF(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def test_transformers_gpt2_to_mygpt_and_back(self):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        original = transformers.GPT2LMHeadModel(config).eval()
        original.save_pretrained(os.path.join(self.dir, "src"))
        model = GPT.from_pretrained(os.path.join(self.dir, "src"))
        out = export_hf(model, os.path.join(self.dir, "out"))
        loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        x = torch.randint(0, 50257, (2, 40))
        with torch.no_grad():
            ours, theirs = model(x)[0], loaded(x).logits
            self.assertLess(float((ours - theirs).abs().max()), 1e-5)
            self.assertLess(float((original(x).logits - theirs).abs().max()), 1e-5)
        self.assertIs(loaded.lm_head.weight, loaded.transformer.wte.weight)
        saved = json.loads((out / "config.json").read_text())
        self.assertEqual((saved["n_ctx"], saved["n_positions"], saved["tie_word_embeddings"]), (64, 64, True))
        from safetensors.torch import load_file
        tensors = load_file(out / "model.safetensors")
        self.assertNotIn("lm_head.weight", tensors)  # tied: transformers ties it again
        self.assertEqual(tuple(tensors["transformer.h.0.attn.c_attn.weight"].shape), (32, 96))  # Conv1D: (in, out)

    def test_tokenizer_loads_offline_and_gives_gpt2_ids(self):
        out = export_hf(small_model(), self.dir)
        tok = transformers.AutoTokenizer.from_pretrained(out)
        enc = get_encoder()  # tested against tiktoken in test_bpe
        self.assertEqual(tok.encode(TEXT), enc.encode(TEXT, allowed_special="all"))
        self.assertEqual(tok.decode(enc.encode(TEXT, allowed_special="all")), TEXT)
        self.assertEqual((tok.eos_token_id, tok.model_max_length), (50256, 64))

    def test_untied_head_is_written(self):
        model = small_model(tie_weights=False)
        loaded = transformers.GPT2LMHeadModel.from_pretrained(export_hf(model, self.dir)).eval()
        x = torch.randint(0, 50257, (1, 30))
        with torch.no_grad():
            self.assertLess(float((model(x)[0] - loaded(x).logits).abs().max()), 1e-5)
        self.assertFalse(torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight))

    def test_trained_bpe_vocabulary_ships(self):
        encoder = train_bpe("the quick brown fox jumps over the lazy dog; " * 50, vocab_size=300)
        model = small_model(vocab_size=encoder.vocab_size)
        tok = transformers.AutoTokenizer.from_pretrained(export_hf(model, self.dir, tokenizer=encoder))
        text = "the lazy dog jumps<|endoftext|> quick"
        self.assertEqual(tok.encode(text), encoder.encode(text, allowed_special="all"))

    def test_weights_alone_for_a_vocabulary_without_tokenizer(self):
        model = small_model(vocab_size=65)
        with self.assertRaisesRegex(ValueError, "vocab_size is 65"):
            export_hf(model, self.dir)  # GPT-2's tokenizer by default, which does not fit
        with self.assertRaisesRegex(ValueError, "character vocabulary"):
            export_hf(model, self.dir, tokenizer={"type": "chars", "chars": list("abc")})
        out = export_hf(model, self.dir, tokenizer=None)
        self.assertFalse((out / "vocab.json").exists())
        loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        x = torch.randint(0, 65, (2, 10))
        with torch.no_grad():
            self.assertLess(float((model(x)[0] - loaded(x).logits).abs().max()), 1e-5)

    def test_a_folder_holds_exactly_one_export(self):
        out = os.path.join(self.dir, "hf")
        export_hf(small_model(), out)
        transformers.GPT2LMHeadModel.from_pretrained(out).save_pretrained(out)  # + generation_config.json
        transformers.AutoTokenizer.from_pretrained(out).save_pretrained(out)  # + tokenizer.json, special_tokens_map
        earlier = sorted(os.listdir(out))
        self.assertIn("tokenizer.json", earlier)
        encoder = train_bpe("the quick brown fox jumps over the lazy dog; " * 50, vocab_size=300)
        model = small_model(vocab_size=encoder.vocab_size)
        with self.assertRaisesRegex(FileExistsError, "hf holds an earlier export .*overwrite=True"):
            export_hf(model, out, tokenizer=encoder)
        self.assertEqual(sorted(os.listdir(out)), earlier)
        export_hf(model, out, tokenizer=encoder, overwrite=True)
        self.assertEqual(sorted(os.listdir(out)), ["config.json", "merges.txt", "model.safetensors",
                                                   "tokenizer_config.json", "vocab.json"])
        self.assertEqual(len(transformers.AutoTokenizer.from_pretrained(out)), encoder.vocab_size)  # not 50,257
        with open(os.path.join(out, "notes.txt"), "w") as f:  # the user's: never deleted, even with overwrite
            f.write("mine")
        os.mkdir(os.path.join(out, "runs"))
        with self.assertRaisesRegex(FileExistsError, r"not a transformers model's \(notes.txt, runs\)"):
            export_hf(model, out, tokenizer=None, overwrite=True)
        self.assertEqual(len(os.listdir(out)), 7)

    def test_refusals_say_why(self):
        for kw, reason in REFUSED:
            with self.subTest(**kw), self.assertRaisesRegex(ValueError, f"cannot export.*{reason}"):
                export_hf(small_model(**kw), self.dir)
        with self.assertRaisesRegex(ValueError, "int8"):
            export_hf(quantize(small_model()), self.dir)
        self.assertEqual(os.listdir(self.dir), [])  # refused before anything was written


@unittest.skipIf(transformers is None, "needs transformers (pip install 'mygpt[test]')")
class TestExportLlamaHF(TempDirTest):
    def test_llama_and_qwen3_load_in_transformers_with_the_same_logits(self):
        from safetensors.torch import load_file
        for architecture, kw in LLAMAS:
            with self.subTest(architecture, **kw):
                model = llama_model(**kw)
                self.assertEqual(export_architecture(model), architecture)
                out = export_hf(model, os.path.join(self.dir, str(len(os.listdir(self.dir)))), tokenizer=None)
                loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
                self.assertEqual(type(loaded).__name__, f"{architecture}ForCausalLM")
                x = torch.randint(0, 512, (2, 64))  # the whole block: rotations up to position 63
                with torch.no_grad():
                    ours, theirs = model(x)[0], loaded(x).logits
                self.assertGreater(float(ours.std()), 0.5)  # logits of unit scale, not near zero
                self.assertLess(float((ours - theirs).abs().max()), 1e-4)
                c, hf = model.config, loaded.config
                self.assertEqual((hf.num_key_value_heads, hf.head_dim, hf.intermediate_size, hf.rms_norm_eps),
                                 (c.n_kv_head or 4, 8, kw.get("mlp_hidden", 88), RMS_EPS))
                self.assertEqual(hf.rope_parameters["rope_theta"], c.rope_base)
                tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
                self.assertEqual(tied, c.tie_weights)
                self.assertEqual("lm_head.weight" in load_file(out / "model.safetensors"), not c.tie_weights)
                gains = [p for name, p in loaded.named_parameters() if "norm" in name]  # mygpt's RMSNorm has none
                self.assertEqual(len(gains), 2 * c.n_layer + 1 + (2 * c.n_layer if c.qk_norm else 0))
                self.assertTrue(all(bool((g == 1).all()) for g in gains))

    def test_rmsnorm_puts_eps_where_transformers_does(self):
        # x * rsqrt(mean(x²) + eps), not x / (rms(x) + eps): with mean(x²) near eps the two differ by a third
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            export_hf(llama_model(qk_norm=True), self.dir, tokenizer=None)).eval()
        x = torch.randn(3, 5, 32) * 1e-3
        with torch.no_grad():
            expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            torch.testing.assert_close(_rms_norm(x), expected, atol=0, rtol=1e-6)
            torch.testing.assert_close(loaded.model.norm(x), expected, atol=0, rtol=1e-6)
            q_norm = loaded.model.layers[0].self_attn.q_norm  # Qwen3's, over a head's 8 channels
            torch.testing.assert_close(q_norm(x.view(3, 5, 4, 8)), _rms_norm(x.view(3, 5, 4, 8)), atol=0, rtol=1e-6)

    def test_a_llama_folder_ships_gpt2s_tokenizer(self):
        model = GPT(small_config(**LLAMA))
        out = export_hf(model, self.dir)
        tok = transformers.AutoTokenizer.from_pretrained(out)
        enc = get_encoder()
        self.assertEqual(tok.encode(TEXT), enc.encode(TEXT, allowed_special="all"))
        config = json.loads((out / "config.json").read_text())
        self.assertEqual((config["architectures"], config["bos_token_id"], config["eos_token_id"]),
                         (["LlamaForCausalLM"], 50256, 50256))

    def test_the_modern_recipe_is_refused_naming_its_three_switches(self):  # REFUSED: one switch each
        C = CfgNode(model=small_config())
        apply_recipe(C, "modern")  # Qwen3 but for three switches
        with self.assertRaisesRegex(ValueError, "the nearest, Qwen3, cannot represent embd_norm=True .*; "
                                                "logit_softcap=15.0 .*; mlp='relu2' \\(Qwen3 has mlp='swiglu'\\)$"):
            export_hf(GPT(C.model), self.dir)
        self.assertEqual(os.listdir(self.dir), [])

    def test_command_line_export_names_the_architecture(self):
        from tests.test_cli import run
        for architecture, kw in LLAMAS[1:3]:
            model = llama_model(**kw)
            ckpt, out = os.path.join(self.dir, f"{architecture}.pt"), os.path.join(self.dir, architecture)
            save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, ckpt)
            status, printed, err = run("export", ckpt, "--format", "hf", "--out", out)
            self.assertEqual(status, 0, err)
            self.assertIn(f"(transformers, {architecture}, weights only: no tokenizer)", printed)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            x = torch.randint(0, 512, (1, 20))
            with torch.no_grad():
                self.assertLess(float((model(x)[0] - loaded(x).logits).abs().max()), 1e-4)
            status, printed, err = run("export", ckpt, "--format", "gguf", "--out", out + ".gguf")
            self.assertEqual((status, err), (0, ""))
            self.assertIn(f"(GGUF, {architecture}, weights only", printed)


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}, {k: f.contents() for k, f in reader.fields.items()}


def q8_0_dequantize(raw, shape):
    """Q8_0 by hand: each block of 32 values is a float16 scale d and 32 int8 q, value = d * q."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def halves_from_pairs(weight, hs):
    """llama.cpp's llama q/k rows put back by their definition: in each head, row 2j holds row j of transformers'
    and row 2j + 1 its row j + hs/2."""
    out = torch.empty_like(weight)
    for head in range(0, weight.shape[0], hs):
        for j in range(hs // 2):
            out[head + j], out[head + hs // 2 + j] = weight[head + 2 * j], weight[head + 2 * j + 1]
    return out


@unittest.skipIf(gguf is None, "needs the gguf package (pip install 'mygpt[export]')")
class TestExportGGUF(unittest.TestCase):
    NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.h.1.ln_1.weight": "blk.1.attn_norm.weight", "transformer.h.1.ln_1.bias": "blk.1.attn_norm.bias",
             "transformer.h.1.attn.c_attn.weight": "blk.1.attn_qkv.weight",
             "transformer.h.1.attn.c_attn.bias": "blk.1.attn_qkv.bias",
             "transformer.h.1.attn.c_proj.weight": "blk.1.attn_output.weight",
             "transformer.h.1.ln_2.bias": "blk.1.ffn_norm.bias", "transformer.h.1.mlp.c_fc.weight": "blk.1.ffn_up.weight",
             "transformer.h.1.mlp.c_proj.weight": "blk.1.ffn_down.weight",
             "transformer.h.1.mlp.c_proj.bias": "blk.1.ffn_down.bias",
             "transformer.ln_f.weight": "output_norm.weight", "lm_head.weight": "output.weight"}

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "model.gguf")

    def tearDown(self):
        self.tmp.cleanup()

    def test_f32_names_shapes_values_and_metadata(self):
        model = small_model()
        _, tensors, meta = read_gguf(export_gguf(model, self.path, dtype="f32"))
        state = model.state_dict()
        self.assertEqual(len(tensors), len(state))
        for ours, theirs in self.NAMES.items():
            t = tensors[theirs]
            self.assertEqual(list(t.shape), list(reversed(state[ours].shape)))  # GGUF lists the fastest dim first
            self.assertTrue(np.array_equal(np.asarray(t.data).reshape(state[ours].shape), state[ours].numpy()))
        expected = {"general.architecture": "gpt2", "gpt2.context_length": 64, "gpt2.embedding_length": 32,
                    "gpt2.feed_forward_length": 128, "gpt2.block_count": 2, "gpt2.attention.head_count": 4,
                    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 50256,
                    "tokenizer.ggml.eos_token_id": 50256, "general.file_type": 0}
        self.assertEqual({k: meta[k] for k in expected}, expected)
        self.assertAlmostEqual(meta["gpt2.attention.layer_norm_epsilon"], 1e-5, places=10)
        enc = get_encoder()
        self.assertEqual(meta["tokenizer.ggml.tokens"], [t for t, _ in sorted(enc.encoder.items(), key=lambda x: x[1])])
        self.assertEqual(meta["tokenizer.ggml.merges"][:3], [f"{a} {b}" for a, b in enc.merges[:3]])
        self.assertEqual(len(meta["tokenizer.ggml.merges"]), len(enc.merges))
        types = meta["tokenizer.ggml.token_type"]
        self.assertEqual((types[50256], types[0], set(types[:50256])), (3, 1, {1}))  # <|endoftext|> is CONTROL

    def test_f16_matrices_and_f32_vectors(self):
        model = small_model()
        _, tensors, meta = read_gguf(export_gguf(model, self.path, dtype="f16"))
        state = model.state_dict()
        for ours, theirs in self.NAMES.items():
            t = tensors[theirs]
            matrix = state[ours].dim() == 2 and not theirs.startswith("position_embd")
            self.assertEqual(t.tensor_type.name, "F16" if matrix else "F32")
            expected = state[ours].half().float() if matrix else state[ours]
            self.assertTrue(np.array_equal(np.asarray(t.data, dtype=np.float32).reshape(state[ours].shape),
                                           expected.numpy()))
        self.assertEqual(meta["general.file_type"], 1)

    def test_q8_0_dequantizes_within_half_a_step(self):
        model = small_model(n_embd=48)  # rows of 48 cannot form Q8_0 blocks of 32: those matrices fall back to f16
        _, tensors, meta = read_gguf(export_gguf(model, self.path, dtype="q8_0"))
        state = model.state_dict()
        self.assertEqual(meta["general.file_type"], 7)
        self.assertEqual(tensors["blk.0.attn_qkv.weight"].tensor_type.name, "F16")
        self.assertEqual(tensors["position_embd.weight"].tensor_type.name, "F32")
        down = tensors["blk.0.ffn_down.weight"]  # rows of 4 x 48 = 192 = 6 blocks
        self.assertEqual(down.tensor_type.name, "Q8_0")
        w = state["transformer.h.0.mlp.c_proj.weight"].numpy()
        self.assertEqual(list(down.shape), [192, 48])
        ours = q8_0_dequantize(down.data, w.shape)
        theirs = gguf.quants.dequantize(down.data, down.tensor_type)
        self.assertTrue(np.array_equal(ours, theirs))
        step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        # half a step of rounding, plus the float16 rounding of the scale (2^-11 relative) times |q| <= 127
        self.assertTrue(np.all(np.abs(ours.reshape(-1, 32) - w.reshape(-1, 32)) <= step * (0.5 + 127 * 2 ** -11)))

    def test_vocabulary_padded_to_the_model(self):
        _, _, meta = read_gguf(export_gguf(small_model(vocab_size=50304), self.path))
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        self.assertEqual((len(tokens), tokens[50257], tokens[-1], types[50257]), (50304, "[PAD50257]", "[PAD50303]", 4))

    def test_weights_alone_say_tokenizer_none_with_the_vocabulary_size(self):
        # llama.cpp refused a file without tokenizer.ggml.model ("key not found"); "none" loads on token ids
        model = small_model(vocab_size=65)  # a character vocabulary's size
        _, tensors, meta = read_gguf(export_gguf(model, self.path, tokenizer=None, dtype="f32"))
        self.assertEqual((meta["tokenizer.ggml.model"], meta["gpt2.vocab_size"]), ("none", 65))
        self.assertNotIn("tokenizer.ggml.tokens", meta)
        self.assertEqual(list(tensors["token_embd.weight"].shape), [32, 65])
        _, _, meta = read_gguf(export_gguf(small_model(), self.path))
        self.assertEqual((meta["tokenizer.ggml.model"], meta["gpt2.vocab_size"]), ("gpt2", 50257))

    @unittest.skipIf(importlib.util.find_spec("safetensors") is None, "needs safetensors (pip install 'mygpt[export]')")
    def test_llama_and_qwen3_names_metadata_and_tensors(self):
        from safetensors.torch import load_file
        for architecture, kw in LLAMAS:
            with self.subTest(architecture, **kw):
                model = llama_model(**kw)
                c, arch = model.config, architecture.lower()
                hf = load_file(export_hf(model, os.path.join(self.tmp.name, "hf"), tokenizer=None, overwrite=True)
                               / "model.safetensors")
                _, tensors, meta = read_gguf(export_gguf(model, self.path, tokenizer=None, dtype="f32"))
                expected = {"general.architecture": arch, f"{arch}.context_length": 64, f"{arch}.block_count": 2,
                            f"{arch}.embedding_length": 32, f"{arch}.feed_forward_length": kw.get("mlp_hidden", 88),
                            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": c.n_kv_head or 4,
                            f"{arch}.rope.dimension_count": 8, f"{arch}.attention.key_length": 8,
                            f"{arch}.attention.value_length": 8, f"{arch}.vocab_size": 512,
                            "tokenizer.ggml.model": "none", "general.file_type": 0}
                self.assertEqual({k: meta[k] for k in expected}, expected)
                self.assertEqual(meta[f"{arch}.rope.freq_base"], c.rope_base)
                self.assertAlmostEqual(meta[f"{arch}.attention.layer_norm_rms_epsilon"], 1e-6, places=12)
                # the names gguf-py's map gives the transformers names (convert_hf_to_gguf.py's), and the head
                names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], 2)
                expected = {names.get_name(name, try_suffixes=(".weight",)): name for name in hf}
                expected["output.weight"] = "model.embed_tokens.weight" if c.tie_weights else "lm_head.weight"
                self.assertEqual(set(tensors), set(expected))
                for name, hf_name in expected.items():
                    t, reference = tensors[name], hf[hf_name]
                    self.assertEqual(list(t.shape), list(reversed(reference.shape)))  # the fastest dim first
                    data = torch.from_numpy(np.asarray(t.data).reshape(reference.shape).copy())
                    if architecture == "Llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                        self.assertFalse(torch.equal(data, reference))
                        data = halves_from_pairs(data, 8)
                    self.assertTrue(torch.equal(data, reference), name)

    def test_llama_rope_on_the_reordered_rows_gives_transformers_scores(self):
        """llama.cpp's llama rotates adjacent channels (2j, 2j + 1) as one complex number; on the GGUF's q and k
        rows its attention scores are those of mygpt's (and transformers') half-split rotation."""
        model = llama_model(n_kv_head=2, rope_base=500.0)
        _, tensors, _ = read_gguf(export_gguf(model, self.path, tokenizer=None, dtype="f32"))
        x = torch.randn(10, 32)  # 10 positions
        positions = torch.arange(10, dtype=torch.float64)

        def llama_cpp_rope(w):  # (T, heads, 8): adjacent pairs times e^{i t θ_j}, θ_j = base^(-2j/8), in float64
            pairs = torch.view_as_complex((x.double() @ w.double().T).view(10, -1, 4, 2).contiguous())
            theta = 500.0 ** (-2.0 * torch.arange(4, dtype=torch.float64) / 8)
            rotated = pairs * torch.polar(torch.ones(10, 1, 4, dtype=torch.float64), positions[:, None, None] * theta)
            return torch.view_as_real(rotated).reshape(10, -1, 8).transpose(0, 1)   # (heads, T, 8)

        def mygpt_rope(w):
            cos, sin = rotary_angles(8, torch.arange(10), 500.0)
            return apply_rotary((x @ w.T).view(1, 10, -1, 8).transpose(1, 2), cos, sin)[0].double()

        def scores(q, k):  # query head h reads key head h // 2
            return q @ k.repeat_interleave(2, dim=0).transpose(1, 2)

        wq, wk, _ = model.transformer.h[0].attn.c_attn.weight.detach().split([32, 16, 16])
        gguf_q, gguf_k = (torch.from_numpy(np.asarray(tensors[f"blk.0.attn_{n}.weight"].data).copy()) for n in "qk")
        ours = scores(mygpt_rope(wq), mygpt_rope(wk))
        torch.testing.assert_close(scores(llama_cpp_rope(gguf_q), llama_cpp_rope(gguf_k)), ours, atol=1e-5, rtol=0)
        self.assertGreater(float((scores(llama_cpp_rope(wq), llama_cpp_rope(wk)) - ours).abs().max()), 0.1)

    def test_llama_norms_stay_f32_in_q8_0(self):
        _, tensors, meta = read_gguf(export_gguf(llama_model(qk_norm=True, mlp_hidden=40), self.path, dtype="q8_0",
                                                 tokenizer=None))
        types = {name: t.tensor_type.name for name, t in tensors.items()}
        self.assertEqual((types["blk.0.attn_norm.weight"], types["blk.0.attn_q_norm.weight"], types["output_norm.weight"]),
                         ("F32", "F32", "F32"))
        self.assertEqual((types["blk.0.attn_q.weight"], types["blk.0.ffn_gate.weight"], types["output.weight"]),
                         ("Q8_0", "Q8_0", "Q8_0"))
        self.assertEqual(types["blk.0.ffn_down.weight"], "F16")  # rows of 40: no blocks of 32
        self.assertEqual(meta["general.architecture"], "qwen3")

    @unittest.skipIf(importlib.util.find_spec("llama_cpp") is None, "needs llama-cpp-python")
    def test_llama_and_qwen3_run_in_llama_cpp_with_the_same_logits(self):
        import llama_cpp
        ids = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(0)).tolist()
        for architecture, kw in LLAMAS:
            with self.subTest(architecture, **kw):
                model = llama_model(**kw)
                export_gguf(model, self.path, tokenizer=None, dtype="f32")
                # an f32 KV cache: llama.cpp's default f16 one moves these logits (up to about 5) by up to 5e-3
                llm = llama_cpp.Llama(model_path=self.path, n_ctx=64, logits_all=True, verbose=False,
                                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
                llm.eval(ids)
                theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
                with torch.no_grad():
                    ours, _ = model(torch.tensor([ids]))
                np.testing.assert_allclose(theirs, ours[0].numpy(), atol=1e-4, rtol=0)
        export_gguf(GPT(small_config(**LLAMA, qk_norm=True)), self.path)  # with GPT-2's tokenizer
        llm = llama_cpp.Llama(model_path=self.path, vocab_only=True, verbose=False)
        self.assertEqual(llm.tokenize(TEXT.encode(), add_bos=False), get_encoder().encode(TEXT))

    @unittest.skipIf(importlib.util.find_spec("llama_cpp") is None, "needs llama-cpp-python")
    def test_character_model_runs_in_llama_cpp_with_the_same_logits(self):
        import llama_cpp
        model = small_model(vocab_size=65)
        export_gguf(model, self.path, tokenizer=None, dtype="f32")
        ids = [5, 17, 3, 64, 0, 42, 8]
        llm = llama_cpp.Llama(model_path=self.path, n_ctx=64, logits_all=True, verbose=False)
        llm.eval(ids)
        theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
        with torch.no_grad():
            ours, _ = model(torch.tensor([ids]))
        np.testing.assert_allclose(theirs, ours[0].numpy(), atol=1e-3, rtol=0)

    def test_refusals_say_why(self):
        for kw, reason in REFUSED:
            with self.subTest(**kw), self.assertRaisesRegex(ValueError, f"cannot export to GGUF.*{reason}"):
                export_gguf(small_model(**kw), self.path)
        with self.assertRaisesRegex(ValueError, "int8"):
            export_gguf(quantize(small_model()), self.path)
        with self.assertRaisesRegex(ValueError, "dtype"):
            export_gguf(small_model(), self.path, dtype="q4_0")
        with self.assertRaisesRegex(ValueError, "vocab_size is 65"):
            export_gguf(small_model(vocab_size=65), self.path)
        self.assertFalse(os.path.exists(self.path))


if __name__ == "__main__":
    unittest.main()
