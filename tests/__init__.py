"""mygpt's tests. Progress bars (tqdm's, which transformers' use too) are off while they run, here and in the
processes they start: they would print among unittest's dots."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
