import contextlib
import io
import json
import math
import os
import signal
import unittest

import torch
import torch.distributed as dist

from mygpt.model import GPT
from mygpt.quantize import Int8Linear, save_quantized
from mygpt.checkpoint import CheckpointError, _checksum, load_checkpoint
from mygpt.trainer import Trainer, _scheduled_lr
from tests.helpers import TempDirTest, kill_and_resume, process_level, run_script, torchrun
from tests.trainer_run import CountingData, TinyLM, config

class TestSchedule(unittest.TestCase):
    def test_formula_at_known_token_counts(self):
        C = config(lr_decay=True, learning_rate=1.0, warmup_tokens=100, final_tokens=1100)

        def mingpt(progress):  # minGPT's lr_mult: max(0.1, 0.5 * (1 + cos(pi * progress)))
            return max(0.1, 0.5 * (1 + math.cos(math.pi * progress)))

        def nanogpt(progress):  # nanoGPT's get_lr: min_lr + coeff * (max_lr - min_lr), min_lr = 10%
            return 0.1 + 0.5 * (1 + math.cos(math.pi * progress)) * 0.9
        for name, cosine in (("mingpt", mingpt), ("nanogpt", nanogpt)):
            with self.subTest(lr_schedule=name):
                C.lr_schedule = name
                self.assertEqual(_scheduled_lr(C, 0), 0.0)
                self.assertAlmostEqual(_scheduled_lr(C, 25), 0.25)
                self.assertAlmostEqual(_scheduled_lr(C, 100), 1.0)
                for tokens in (350, 600, 850, 1000, 1099, 1100):
                    self.assertAlmostEqual(_scheduled_lr(C, tokens), cosine((tokens - 100) / 1000), places=12)
                self.assertAlmostEqual(_scheduled_lr(C, 10 ** 9), 0.1)  # flat after final_tokens
        self.assertGreater(_scheduled_lr(C, 1099), 0.1)  # nanoGPT's reaches the floor exactly at final_tokens
        C.lr_schedule = "mingpt"
        self.assertEqual(_scheduled_lr(C, 1000), 0.1)  # minGPT's is on the floor from progress ~0.8
        self.assertEqual(Trainer.get_default_config().lr_schedule, "mingpt")  # the seed's
        C.lr_decay = False
        self.assertEqual(_scheduled_lr(C, 600), 1.0)

    @process_level
    def test_the_seeds_log_is_reproduced(self):
        # README-seed.txt: max_epochs=150, batch_size=256, learning_rate=6e-4, lr_decay, warmup_tokens=512*20,
        # final_tokens=150*len(train_dataset)*block_size, block 128, 34 iterations an epoch; it prints the lr
        # after the last step of these epochs. A train set of 8,640 windows (8,631 to 8,650 all give these).
        printed = {1: "5.999354e-04", 2: "5.997392e-04", 3: "5.994116e-04", 50: "4.500336e-04",
                   100: "1.500168e-04", 148: "6.000000e-05", 149: "6.000000e-05", 150: "6.000000e-05"}
        n, block = 8640, 128

        class Windows(torch.utils.data.Dataset):  # the Trainer only counts targets: no text needed
            example = (torch.zeros(block, dtype=torch.long), torch.zeros(block, dtype=torch.long))

            def __len__(self):
                return n

            def __getitem__(self, i):
                return self.example

        class StandIn(torch.nn.Module):  # a model of one weight: the schedule does not depend on it
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(()))

            def forward(self, x, y):
                return None, self.w * 0 + 1.0
        C = config(max_epochs=150, batch_size=256, learning_rate=6e-4, lr_decay=True, warmup_tokens=512 * 20,
                   final_tokens=150 * n * block, log_interval=0)
        trainer = Trainer(C, StandIn(), Windows())
        logged = {}
        trainer.add_callback("on_epoch_end", lambda t: logged.setdefault(t.epoch, f"{t.lr:e}"))
        trainer.run()
        self.assertEqual(trainer.steps_per_epoch(), 34)
        self.assertEqual(trainer.tokens, 150 * n * block)  # each epoch each example once: the last batch short
        self.assertEqual({epoch: logged[epoch] for epoch in printed}, printed)

    def test_trainer_fills_the_schedule_from_max_iters(self):
        C = config(max_iters=100, batch_size=8, grad_accum_steps=2, lr_decay=True)
        trainer = Trainer(C, TinyLM(), CountingData(64))
        targets = int((CountingData(64)[0][1] >= 0).sum())
        self.assertEqual(trainer.config.final_tokens, 100 * 8 * 2 * targets)
        self.assertEqual(trainer.config.warmup_tokens, trainer.config.final_tokens // 20)
        self.assertIsNone(C.final_tokens)  # the caller's config is left as it was
        # max_epochs: 64 examples in steps of 16 is 4 steps an epoch; the earlier end wins
        trainer = Trainer(config(max_epochs=3, max_iters=100, batch_size=16, lr_decay=True), TinyLM(), CountingData(64))
        self.assertEqual(trainer.config.final_tokens, 3 * 4 * 16 * targets)
        given = Trainer(config(max_iters=100, warmup_tokens=0, final_tokens=500), TinyLM(), CountingData(64))
        self.assertEqual((given.config.warmup_tokens, given.config.final_tokens), (0, 500))

    def test_decay_without_an_end_is_refused(self):
        with self.assertRaisesRegex(ValueError, "max_iters or max_epochs"):
            Trainer(config(lr_decay=True), TinyLM(), CountingData(64))

    def test_trainer_counts_only_real_targets(self):
        class ThreeIgnored(CountingData):
            def __getitem__(self, i):
                x = super().__getitem__(i)[0]
                y = torch.cat([torch.full((3,), -1), (x[3:] + 1) % 16])
                return x, y
        C = config(max_iters=3, lr_decay=True, warmup_tokens=10 ** 6, final_tokens=10 ** 7)
        trainer = Trainer(C, TinyLM(), ThreeIgnored(64)).run()
        self.assertEqual(trainer.tokens, 3 * 8 * 5)  # 3 steps of 8 examples with 5 real targets each
        self.assertAlmostEqual(trainer.lr, C.learning_rate * trainer.tokens / 10 ** 6)


class TestTraining(TempDirTest):
    def test_gpt_loss_falls_and_history_is_written(self):
        mc = GPT.get_default_config()
        mc.model_type = None
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 2, 2, 32, 16, 8
        torch.manual_seed(0)
        C = config(max_iters=60, batch_size=16, learning_rate=3e-3, eval_interval=20, eval_iters=2)
        trainer = Trainer(C, GPT(mc), CountingData(256), val_dataset=CountingData(64))
        events = []
        for event in ("on_batch_end", "on_epoch_end", "on_eval_end"):
            trainer.add_callback(event, lambda t, e=event: events.append(e))
        first = trainer.evaluate()
        trainer.run()
        self.assertLess(trainer.evaluate(), first / 3)
        self.assertEqual((trainer.iter_num, trainer.epoch), (60, 3))  # 16 steps an epoch
        self.assertEqual(events.count("on_batch_end"), 60)
        self.assertEqual(events.count("on_epoch_end"), 3)
        self.assertEqual(events.count("on_eval_end"), 3)
        trainer.save_history(self.path("h.csv"))
        trainer.save_history(self.path("h.json"))
        with open(self.path("h.csv")) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], "iter,epoch,tokens,lr,loss,val_loss")
        self.assertEqual(len(lines), 61)
        with open(self.path("h.json")) as f:
            self.assertIn("val_loss", json.load(f)[19])

    def test_evaluation_options(self):
        # eval_order='first': the first eval_iters batches, in order; eval_bits_per_byte: val_bpb, the targets'
        # bytes counted by the run's tokenizer (one byte a character here: loss / ln 2); eval_at_start: once before
        # the first step, logged only
        torch.manual_seed(0)
        C = config(max_iters=2, batch_size=4, eval_interval=2, eval_iters=2, eval_order="first",
                   eval_bits_per_byte=True, eval_at_start=True)
        chars = {"type": "chars", "chars": list("abcdefghijklmnop")}
        model, val = TinyLM(), CountingData(32)
        trainer = Trainer(C, model, CountingData(64), val, tokenizer=chars)
        x, y = (torch.stack(t) for t in zip(*(val[i] for i in range(8))))  # the first 2 batches of 4: (8, T) each
        with torch.no_grad():
            logits = model.eval()(x)[0]
        model.train()
        by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).item()
        self.assertAlmostEqual(trainer.evaluate(), by_hand, places=5)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            trainer.run()
        self.assertRegex(printed.getvalue(), r"(?m)^iter 0: val loss \d\.\d{5}, \d\.\d{5} bits per byte$")
        self.assertEqual([h["iter"] for h in trainer.history if "val_loss" in h], [2])
        self.assertAlmostEqual(trainer.history[-1]["val_bpb"], trainer.history[-1]["val_loss"] / math.log(2), places=6)
        with self.assertRaisesRegex(ValueError, r"eval_bits_per_byte=True .*Trainer\(\.\.\., tokenizer="):
            Trainer(C, TinyLM(), CountingData(64), val)
        with self.assertRaisesRegex(ValueError, r"eval_order must be one of \['random', 'first'\]"):
            Trainer(config(eval_order="last"), TinyLM(), CountingData(64))

    def test_progress_line_in_the_seed_words(self):
        C = config(max_iters=4, quiet=True, log_interval=2, batch_size=32)
        from contextlib import redirect_stdout
        from io import StringIO
        out = StringIO()
        with redirect_stdout(out):
            Trainer(C, TinyLM(), CountingData(64)).run()
        lines = out.getvalue().splitlines()
        self.assertRegex(lines[0], r"^epoch 1 iter 1: train loss \d\.\d{5}\. lr 1\.000000e-02$")
        self.assertTrue(lines[1].startswith("epoch 2 iter 1: "))

    def test_grad_accumulation_equals_a_larger_batch(self):
        # Batches hold different numbers of real targets: averaging per micro-batch would not match.
        results = []
        for batch, accum in ((16, 1), (8, 2), (4, 4)):
            torch.manual_seed(0)
            C = config(max_iters=10, batch_size=batch, grad_accum_steps=accum)
            trainer = Trainer(C, TinyLM(dropout=0.0), CountingData(100)).run()
            results.append((trainer.model.state_dict(), trainer.tokens, trainer.history))
        for state, tokens, history in results[1:]:
            self.assertEqual(tokens, results[0][1])
            for k, v in state.items():
                torch.testing.assert_close(v, results[0][0][k], rtol=1e-5, atol=1e-6)
            for a, b in zip(history, results[0][2]):
                self.assertAlmostEqual(a["loss"], b["loss"], places=5)

    def test_bf16_and_fp16_autocast_on_cpu(self):
        for precision in ("bf16", "fp16"):
            torch.manual_seed(0)
            C = config(max_iters=20, precision=precision, ckpt_path=self.path(f"{precision}.pt"))
            trainer = Trainer(C, TinyLM(), CountingData(64)).run()
            self.assertTrue(math.isfinite(trainer.loss))
            self.assertLess(trainer.loss, trainer.history[0]["loss"])
            self.assertEqual(trainer.model.head.weight.dtype, torch.float32)  # autocast, not a cast
            ckpt = load_checkpoint(C.ckpt_path)
            self.assertEqual(bool(ckpt["scaler"]), precision == "fp16")

    def test_precision_auto(self):
        self.assertEqual(Trainer.get_default_config().precision, "auto")  # the default since the race in the README
        from contextlib import redirect_stdout
        from io import StringIO
        from unittest import mock
        import mygpt.precision as precision

        def auto(native, times, min_params=0, **kw):
            out = StringIO()
            with mock.patch.object(precision, "native", lambda device, dtype: native), \
                    mock.patch.object(precision, "_PROBE_MIN_PARAMS", min_params), \
                    mock.patch.object(precision, "_probe", lambda step: times), redirect_stdout(out):
                trainer = Trainer(config(**{"precision": "auto", "max_iters": 2, **kw}), TinyLM(), CountingData(64))
            return trainer, out.getvalue()
        trainer, said = auto(False, None)  # no native bf16: no probe at all
        self.assertEqual(trainer.config.precision, "fp32")
        self.assertIn("precision='auto': fp32 (this cpu has no native bf16)", said)
        # a model below the size where bf16 pays: fp32 without a probe (_probe would fail on None)
        trainer, said = auto(True, None, min_params=sum(p.numel() for p in TinyLM().parameters()) + 1)
        self.assertEqual(trainer.config.precision, "fp32")
        self.assertIn("parameters is too small for bf16 to pay", said)
        self.assertEqual(auto(True, (2.0, 1.0))[0].config.precision, "bf16")
        self.assertEqual(auto(True, (1.05, 1.0))[0].config.precision, "fp32")  # within the margin: not worth it
        # the choice is kept in the checkpoint: a resumed run computes as it did, without probing
        trainer, _ = auto(True, (2.0, 1.0), ckpt_path=self.path("a.pt"), resume=True)
        trainer.run()
        self.assertEqual(load_checkpoint(self.path("a.pt"))["train_config"]["precision"], "bf16")
        resumed, said = auto(True, (1.0, 2.0), ckpt_path=self.path("a.pt"), resume=True, max_iters=3)
        self.assertEqual(resumed.config.precision, "bf16")
        self.assertIn("as the run it resumes", said)
        # the probe itself: real passes that leave the weights and gradients as they were
        model = TinyLM()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with mock.patch.object(precision, "native", lambda device, dtype: True), redirect_stdout(StringIO()), \
                mock.patch.object(precision, "_PROBE_MIN_PARAMS", 0):
            trainer = Trainer(config(precision="auto", max_iters=1), model, CountingData(64))
        self.assertIn(trainer.config.precision, ("fp32", "bf16"))
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
        self.assertTrue(all(p.grad is None for p in model.parameters()))
        # a precision this device only emulates is run, with a warning
        out = StringIO()
        with mock.patch.object(precision, "native", lambda device, dtype: False), redirect_stdout(out):
            Trainer(config(precision="bf16", max_iters=1), TinyLM(), CountingData(64))
        self.assertIn("warning: precision='bf16', but this cpu has no native bf16", out.getvalue())

    def test_ctrl_c_saves_and_returns(self):
        C = config(max_iters=50, ckpt_path=self.path("c.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64))
        trainer.add_callback("on_batch_end",
                             lambda t: os.kill(os.getpid(), signal.SIGINT) if t.iter_num == 3 else None)
        before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
        trainer.run()
        self.assertTrue(trainer.interrupted)
        self.assertEqual(trainer.iter_num, 4)  # the step under way when Ctrl-C came is finished first
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 4)
        self.assertIs(signal.getsignal(signal.SIGINT), before)

    def test_a_copy_elsewhere_does_not_skip_the_final_checkpoint(self):
        C = config(max_iters=6, ckpt_path=self.path("run.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64))
        trainer.add_callback("on_batch_end",
                             lambda t: t.save_checkpoint(self.path("best.pt")) if t.iter_num == 6 else None)
        trainer.run()
        self.assertEqual(load_checkpoint(self.path("best.pt"))["iter_num"], 6)
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 6)


class PoisonedLM(TinyLM):
    """Its loss turns NaN once .poison is set."""
    poison = False

    def forward(self, x, y=None):
        logits, loss = super().forward(x, y)
        return logits, loss * float("nan") if self.poison else loss


class TestFailures(TempDirTest):
    def test_nan_loss_stops_naming_the_iteration(self):
        C = config(max_iters=50, ckpt_path=self.path("n.pt"), ckpt_interval=5)
        model = PoisonedLM()
        trainer = Trainer(C, model, CountingData(64))
        trainer.add_callback("on_batch_end", lambda t: setattr(model, "poison", t.iter_num == 7))
        with self.assertRaisesRegex(FloatingPointError, "iteration 7 "):
            trainer.run()
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 5)
        self.assertTrue(all(torch.isfinite(p).all() for p in model.parameters()))  # no update was made

    def test_deferred_loss_reading_skips_a_bad_update_on_the_device(self):
        # What a GPU run does (losses read every log_interval steps), forced here on the CPU.
        mc = GPT.get_default_config()
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, 16, 8
        torch.manual_seed(0)
        model = GPT(mc)
        C = config(max_iters=12, log_interval=4)
        trainer = Trainer(C, model, CountingData(64))
        trainer._deferred = True
        poisoned = {"at": 6}
        real_forward = model.forward

        def forward(x, y=None, **kw):
            logits, loss = real_forward(x, y, **kw)
            return logits, loss * float("nan") if trainer.iter_num == poisoned["at"] else loss
        model.forward = forward
        weights = {}
        trainer.add_callback("on_batch_end", lambda t: weights.__setitem__(t.iter_num, model.lm_head.weight.clone()))
        with self.assertRaisesRegex(FloatingPointError, "iteration 6 "):
            trainer.run()  # reported at the sync after step 8
        self.assertTrue(torch.equal(weights[7], weights[6]))      # the bad step changed nothing
        self.assertFalse(torch.equal(model.lm_head.weight, weights[7]))  # step 8 trained as usual
        self.assertTrue(all(torch.isfinite(p).all() for p in model.parameters()))
        self.assertEqual(len(trainer.optimizer.state[model.lm_head.weight]) and
                         int(trainer.optimizer.state[model.lm_head.weight]["step"]), 7)  # one step skipped

    def test_the_model_refuses_a_bad_id_on_the_host_before_the_step(self):
        # The Trainer knows no vocabulary: it hands every batch, still on the host, to the model's check_batch,
        # all micro-batches of a step before its first forward (on a GPU a bad id would be a device-side assert)
        class Poisoned(CountingData):
            poison = None  # "x" or "y": that tensor of every example holds id 16, one past the vocabulary

            def __getitem__(self, i):
                x, y = super().__getitem__(i)
                if self.poison:
                    {"x": x, "y": y}[self.poison][3] = 16
                return x, y
        mc = GPT.get_default_config()
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, 16, 8
        for poison, message in (("x", r"token id 16 is outside the vocabulary \[0, 16\)$"),
                                ("y", r"target 16 is outside the vocabulary \[0, 16\) \(-1 marks a position")):
            with self.subTest(poison):
                model, data = GPT(mc), Poisoned(64)
                forwards = []
                model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].device.type))
                trainer = Trainer(config(max_iters=8, batch_size=4, grad_accum_steps=2), model, data)
                trainer.add_callback("on_batch_end", lambda t: setattr(data, "poison", poison if t.iter_num == 3
                                                                       else None))
                with self.assertRaisesRegex(ValueError, message):
                    trainer.run()
                self.assertEqual((trainer.iter_num, len(forwards)), (3, 6))  # no forward of step 4 began

        class Checked(TinyLM):  # any model can check its batches: the Trainer calls check_batch on the host
            def check_batch(self, x, y):
                seen.append((x.device.type, tuple(x.shape), tuple(y.shape)))
        seen = []
        trainer = Trainer(config(max_iters=2, batch_size=4, grad_accum_steps=2, eval_interval=2, eval_iters=3),
                          Checked(), CountingData(64), CountingData(16)).run()
        self.assertEqual(seen, [("cpu", (4, 8), (4, 8))] * (2 * 2 + 3))  # 2 steps of 2 micro-batches, 3 to evaluate

    def test_checkpoint_errors(self):
        C = config(max_iters=2, ckpt_path=self.path("good.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64)).run()
        with self.assertRaisesRegex(FileNotFoundError, "no checkpoint"):
            load_checkpoint(self.path("missing.pt"))
        # a torn copy of a good checkpoint: clear error, and the good one still loads
        with open(C.ckpt_path, "rb") as f:
            data = f.read()
        with open(self.path("torn.pt"), "wb") as f:
            f.write(data[: len(data) // 2])
        with self.assertRaisesRegex(CheckpointError, "torn.pt is damaged or not a torch checkpoint"):
            load_checkpoint(self.path("torn.pt"))
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 2)
        torch.save({"weights": 1}, self.path("foreign.pt"))
        with self.assertRaisesRegex(CheckpointError, "not a mygpt checkpoint"):
            load_checkpoint(self.path("foreign.pt"))
        with self.assertRaisesRegex(CheckpointError, r"emb.weight \(16, 32\) vs \(16, 48\)"):
            load_checkpoint(C.ckpt_path, model=TinyLM(width=48))
        # a write that dies half way leaves the previous checkpoint in place
        real_save = torch.save

        def dying_save(obj, f):
            f.write(b"partial")
            raise OSError("disk full")
        torch.save = dying_save
        try:
            trainer.iter_num = 99
            with self.assertRaises(OSError):
                trainer.save_checkpoint()
        finally:
            torch.save = real_save
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 2)

    def test_compiled_model_prefix_is_stripped(self):
        C = config(max_iters=1, ckpt_path=self.path("k.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64)).run()
        ckpt = torch.load(C.ckpt_path, weights_only=True)
        ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}
        del ckpt["checksum"]  # as an older file, written without one
        torch.save(ckpt, C.ckpt_path)
        model = TinyLM()
        load_checkpoint(C.ckpt_path, model=model)
        self.assertTrue(torch.equal(model.head.weight, trainer.model.head.weight))

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "train_dataset is empty"):
            Trainer(config(), TinyLM(), CountingData(0))
        with self.assertRaisesRegex(ValueError, "precision"):
            Trainer(config(precision="fp8"), TinyLM(), CountingData(8))
        with self.assertRaisesRegex(ValueError, "trainer config device='gpu' is not a device"):
            Trainer(config(device="gpu"), TinyLM(), CountingData(8))
        if not torch.cuda.is_available():
            with self.assertRaisesRegex(ValueError, "trainer config device=cuda"):
                Trainer(config(device="cuda"), TinyLM(), CountingData(8))
        with self.assertRaisesRegex(ValueError, "parallel must be one of"):
            Trainer(config(parallel="zero3"), TinyLM(), CountingData(8))

        class XOnly(CountingData):
            def __getitem__(self, i):
                return super().__getitem__(i)[0]
        with self.assertRaisesRegex(TypeError, r"\(x, y\) pairs"):
            Trainer(config(max_iters=1), TinyLM(), XOnly(8)).run()


class TestKeepsTheUsersWork(TempDirTest):
    def test_a_new_run_refuses_an_existing_checkpoint(self):
        C = config(max_iters=3, ckpt_path=self.path("run.pt"))
        Trainer(C, TinyLM(), CountingData(64)).run()
        with self.assertRaisesRegex(FileExistsError, r"run\.pt already holds .*resume=True.*overwrite=True"):
            Trainer(config(max_iters=1, ckpt_path=C.ckpt_path), TinyLM(), CountingData(64))
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 3)
        Trainer(config(max_iters=1, ckpt_path=C.ckpt_path, overwrite=True), TinyLM(), CountingData(64)).run()
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 1)

    def test_a_copy_of_another_run_is_never_replaced(self):
        first = Trainer(config(max_iters=2, ckpt_path=self.path("a.pt")), TinyLM(), CountingData(64)).run()
        first.save_checkpoint(self.path("best.pt"))
        first.save_checkpoint(self.path("best.pt"))  # the same run may replace its own copy
        second = Trainer(config(max_iters=2, ckpt_path=self.path("b.pt")), TinyLM(), CountingData(64)).run()
        with self.assertRaisesRegex(FileExistsError, "another run"):
            second.save_checkpoint(self.path("best.pt"))
        self.assertEqual(load_checkpoint(self.path("best.pt"))["run_id"], first.run_id)

    def test_resume_keeps_the_run_id_and_says_when_starting_fresh(self):
        from contextlib import redirect_stdout
        from io import StringIO
        out = StringIO()
        with redirect_stdout(out):
            first = Trainer(config(max_iters=2, ckpt_path=self.path("r.pt"), resume=True), TinyLM(), CountingData(64))
        self.assertIn("no checkpoint at", out.getvalue())
        first.run()
        again = Trainer(config(max_iters=2, ckpt_path=self.path("r.pt"), resume=True), TinyLM(), CountingData(64))
        self.assertEqual(again.run_id, first.run_id)
        with redirect_stdout(out):
            again.run()
        self.assertIn("nothing to do", out.getvalue())

    def test_resume_refuses_another_architecture_or_tokenizer(self):
        def gpt(**kw):
            mc = GPT.get_default_config()
            mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, 16, 8
            mc.merge_from_dict(kw)
            return GPT(mc)
        chars = {"type": "chars", "chars": "abcdefghijklmnop"}
        C = config(max_iters=2, ckpt_path=self.path("r.pt"), resume=True)
        Trainer(C, gpt(), CountingData(64), tokenizer=chars).run()
        with open(self.path("r.pt"), "rb") as f:
            before = f.read()
        # the same weight shapes, another function: 4 heads of 4 instead of 2 of 8, token shift switched on
        for kw, field in ((dict(n_head=4), "n_head=2"), (dict(token_shift=True), "token_shift=False")):
            with self.subTest(**kw), self.assertRaisesRegex(CheckpointError, f"model.{field}, but .*drop the override"):
                Trainer(config(max_iters=4, ckpt_path=self.path("r.pt"), resume=True), gpt(**kw), CountingData(64),
                        tokenizer=chars)
        with self.assertRaisesRegex(CheckpointError, "another tokenizer"):
            Trainer(config(max_iters=4, ckpt_path=self.path("r.pt"), resume=True), gpt(), CountingData(64),
                    tokenizer={"type": "chars", "chars": "ponmlkjihgfedcba"})
        with open(self.path("r.pt"), "rb") as f:
            self.assertEqual(f.read(), before)  # nothing was written
        # how attention is computed may change: the function is the same
        resumed = Trainer(config(max_iters=4, ckpt_path=self.path("r.pt"), resume=True), gpt(attention="torch"),
                          CountingData(64), tokenizer=chars)
        self.assertEqual(resumed.iter_num, 2)

    def test_a_run_started_beside_another_does_not_replace_its_checkpoint(self):
        # the Trainer holds no folder (runs with other checkpoint files may share one): each save checks
        C = config(max_iters=1, ckpt_path=self.path("c.pt"))
        late, early = Trainer(C, TinyLM(), CountingData(16)), Trainer(C, TinyLM(), CountingData(16))
        early.run()
        with self.assertRaisesRegex(FileExistsError, "holds a checkpoint of another run"):
            late.run()
        self.assertEqual(load_checkpoint(self.path("c.pt"))["run_id"], early.run_id)

    def test_the_last_step_evaluates_and_counts(self):
        for limits, evaluated in ((dict(max_iters=7), [5, 7]), (dict(max_epochs=2), [5, 8]), (dict(max_iters=5), [5])):
            with self.subTest(**limits):
                C = config(batch_size=16, eval_interval=5, eval_iters=1, **limits)  # 4 steps an epoch
                trainer = Trainer(C, TinyLM(), CountingData(64), val_dataset=CountingData(16))
                evals = []
                trainer.add_callback("on_eval_end", lambda t: evals.append(t.iter_num))
                trainer.run()
                self.assertEqual(evals, evaluated)
                self.assertEqual([h["iter"] for h in trainer.history if "val_loss" in h], evaluated)

    def test_a_batch_beyond_the_dataset_takes_it_once(self):
        from contextlib import redirect_stdout
        from io import StringIO
        out = StringIO()
        with redirect_stdout(out):
            trainer = Trainer(config(max_iters=3, batch_size=10 ** 9), TinyLM(), CountingData(40))
            trainer.run()
        self.assertIn("each step takes the whole dataset once", out.getvalue())
        per_step = sum(int((CountingData(40)[i][1] >= 0).sum()) for i in range(40))
        self.assertEqual([h["tokens"] for h in trainer.history], [per_step, 2 * per_step, 3 * per_step])

    def test_a_bad_checkpoint_path_is_refused_before_training(self):
        with self.assertRaisesRegex(ValueError, "is a directory"):
            Trainer(config(max_iters=1, ckpt_path=self.dir), TinyLM(), CountingData(64))
        with open(self.path("file"), "w") as f:
            f.write("x")
        with self.assertRaisesRegex(ValueError, "cannot write checkpoints"):
            Trainer(config(max_iters=1, ckpt_path=self.path("file/ckpt.pt")), TinyLM(), CountingData(64))
        if os.geteuid() != 0:  # root writes anywhere
            os.mkdir(self.path("ro"), 0o500)
            with self.assertRaisesRegex(ValueError, "cannot write checkpoints"):
                Trainer(config(max_iters=1, ckpt_path=self.path("ro/c.pt")), TinyLM(), CountingData(64))

    def test_bit_rot_is_reported_as_damage(self):
        C = config(max_iters=1, ckpt_path=self.path("rot.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64)).run()
        weight = trainer.model.head.weight.detach().numpy().tobytes()
        with open(C.ckpt_path, "rb") as f:
            data = bytearray(f.read())
        at = data.find(weight[:64])  # the head's weights, stored as raw bytes in the zip
        self.assertGreater(at, 0)
        data[at + 5] ^= 0x10
        with open(self.path("rotten.pt"), "wb") as f:
            f.write(data)
        with self.assertRaisesRegex(CheckpointError, "damaged") as caught:
            load_checkpoint(self.path("rotten.pt"))
        self.assertNotIn("weights_only=False", str(caught.exception))

    def test_open_checkpoint_is_the_one_door(self):
        from mygpt import open_checkpoint
        from mygpt.tokenizer import CharTokenizer
        mc = GPT.get_default_config()
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, 16, 8
        chars = {"type": "chars", "chars": list("abcdefghijklmnop")}
        run = self.path("run")
        with self.assertRaisesRegex(FileNotFoundError, "holds no best.pt or checkpoint.pt"):
            os.makedirs(run)
            open_checkpoint(run)
        trainer = Trainer(config(max_iters=1, ckpt_path=os.path.join(run, "checkpoint.pt")), GPT(mc),
                          CountingData(64), tokenizer=chars).run()
        model, tokenizer, ckpt = open_checkpoint(run)  # a run's work dir: its last checkpoint ...
        self.assertFalse(model.training)
        self.assertIsInstance(tokenizer, CharTokenizer)
        self.assertEqual(ckpt["run_id"], trainer.run_id)
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(v, trainer.model.state_dict()[k]), k)
        trainer.config.max_iters = 2
        trainer.run()
        trainer.save_checkpoint(os.path.join(run, "best.pt"))
        self.assertEqual(open_checkpoint(run)[2]["iter_num"], 2)  # ... or its best
        quantized = self.path("int8.pt")
        save_quantized(model.quantize(), quantized, tokenizer=chars)
        self.assertIsInstance(open_checkpoint(quantized)[0].lm_head, Int8Linear)
        Trainer(config(max_iters=1, ckpt_path=self.path("bare.pt")), GPT(mc), CountingData(64)).run()
        self.assertIsNone(open_checkpoint(self.path("bare.pt"))[1])  # no tokenizer recorded
        torch.save({"model": {}}, self.path("foreign.pt"))
        with self.assertRaisesRegex(CheckpointError, "records no model config"):
            open_checkpoint(self.path("foreign.pt"))

    def test_a_flipped_bit_in_the_config_is_damage_too(self):
        mc = GPT.get_default_config()
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, 16, 8
        C = config(max_iters=1, ckpt_path=self.path("c.pt"))
        Trainer(C, GPT(mc), CountingData(64)).run()
        with open(C.ckpt_path, "rb") as f:
            data = bytearray(f.read())
        at = data.find(b"token_shift")
        self.assertGreater(at, 0)
        flag = data.index(0x89, at)  # pickle's NEWFALSE after the key: make it NEWTRUE
        data[flag] = 0x88
        with open(self.path("flipped.pt"), "wb") as f:
            f.write(data)
        self.assertTrue(torch.load(self.path("flipped.pt"), weights_only=True)["model_config"]["token_shift"])
        with self.assertRaisesRegex(CheckpointError, "damaged"):
            load_checkpoint(self.path("flipped.pt"))
        # a file of an earlier version, whose checksum covers its tensors only, still loads
        old = torch.load(C.ckpt_path, weights_only=True)
        old["checksum"] = _checksum(old, values=False)
        torch.save(old, self.path("old.pt"))
        self.assertEqual(load_checkpoint(self.path("old.pt"))["iter_num"], 1)
        old["iter_num"] = 2  # what it does not cover, it cannot vouch for
        torch.save(old, self.path("old.pt"))
        self.assertEqual(load_checkpoint(self.path("old.pt"))["iter_num"], 2)

    def test_failed_write_reports_the_real_cause_and_leaves_no_temporary(self):
        C = config(max_iters=1, ckpt_path=self.path("w.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64)).run()
        real_save = torch.save

        def full_disk(obj, f):
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        torch.save = full_disk
        try:
            with self.assertRaisesRegex(OSError, "No space left on device"):
                trainer.save_checkpoint()
        finally:
            torch.save = real_save
        self.assertEqual(sorted(os.listdir(self.dir)), ["w.pt"])

    def test_sigterm_saves_and_returns(self):
        C = config(max_iters=50, ckpt_path=self.path("t.pt"))
        trainer = Trainer(C, TinyLM(), CountingData(64))
        trainer.add_callback("on_batch_end",
                             lambda t: os.kill(os.getpid(), signal.SIGTERM) if t.iter_num == 2 else None)
        trainer.run()
        self.assertTrue(trainer.interrupted)
        self.assertEqual(load_checkpoint(C.ckpt_path)["iter_num"], 3)

    def test_a_batch_without_targets_adds_nothing(self):
        class SomeMasked(CountingData):
            def __getitem__(self, i):
                x, y = super().__getitem__(i)
                return x, torch.full_like(y, -1) if i < 32 else y
        mc = GPT.get_default_config()
        mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, mc.block_size = 1, 2, 16, 16, 8
        C = config(max_iters=8, batch_size=8, grad_accum_steps=2, eval_iters=2)
        trainer = Trainer(C, GPT(mc), SomeMasked(64), val_dataset=SomeMasked(16)).run()
        self.assertTrue(all(math.isfinite(h["loss"]) for h in trainer.history))
        self.assertTrue(math.isnan(trainer.evaluate()))  # every validation example is masked: said so
        idx = torch.randint(0, 16, (2, 8))
        logits, loss = trainer.model(idx, torch.full_like(idx, -1))
        self.assertEqual(loss.item(), 0.0)


class TestTokenCorpus(TempDirTest):
    def corpus(self):
        from mygpt.data import TokenDataset, write_shard
        g = torch.Generator().manual_seed(0)
        for i in range(2):  # windows cross from the first shard into the second
            write_shard(self.path(f"train_{i:06d}.bin"), torch.randint(0, 16, (301,), generator=g).numpy())
        return TokenDataset(self.path("train_*.bin"), block_size=8)

    def run_for(self, iters, **kw):
        torch.manual_seed(0)
        C = config(max_iters=iters, lr_decay=True, final_tokens=2000, warmup_tokens=100,
                   ckpt_path=self.path("tok.pt"), **kw)
        return Trainer(C, TinyLM(dropout=0.1), self.corpus()).run()

    def test_resume_on_shards_is_bit_identical(self):
        straight = self.run_for(20, overwrite=True).model.state_dict()
        self.run_for(7, overwrite=True)  # stopped mid-epoch (75 windows in steps of 8: 10 steps an epoch)
        resumed = self.run_for(20, resume=True)
        self.assertEqual(resumed.iter_num, 20)
        for k, v in straight.items():
            self.assertTrue(torch.equal(v, resumed.model.state_dict()[k]), k)


class TestResume(TempDirTest):
    @process_level
    def test_sigkill_then_resume_is_bit_identical(self):
        iters = 30
        ref, run = kill_and_resume(self, iters)
        for k, v in ref["model"].items():
            self.assertTrue(torch.equal(v, run["model"][k]), k)
        for i, state in ref["optimizer"]["state"].items():
            for k, v in state.items():
                self.assertTrue(torch.equal(v, run["optimizer"]["state"][i][k]), k)
        self.assertTrue(torch.equal(ref["rng"][0]["torch"], run["rng"][0]["torch"]))
        self.assertEqual(ref["history"], run["history"])
        self.assertEqual((ref["epoch"], ref["epoch_samples"], ref["tokens"]),
                         (run["epoch"], run["epoch_samples"], run["tokens"]))


@unittest.skipUnless(dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is needed")
@process_level
class TestDistributed(TempDirTest):
    def test_two_processes_match_one(self):
        for iters in (5, 12):  # the second launch resumes from the first one's checkpoint
            ddp = torchrun("ddp", self.dir, iters, timeout=180)
            self.assertEqual(ddp.returncode, 0, ddp.stdout[-2000:] + ddp.stderr[-3000:])
        self.assertIn("resumed from", ddp.stdout)
        single = run_script("single", self.dir, 12)
        self.assertEqual(single.returncode, 0, single.stderr)
        rank0, rank1, alone = (torch.load(self.path(f), weights_only=True)
                               for f in ("ddp0.pt", "ddp1.pt", "single0.pt"))
        for k, v in rank0.items():
            self.assertTrue(torch.equal(v, rank1[k]), k)  # different seeds, same weights: DDP broadcast
            torch.testing.assert_close(v, alone[k], rtol=1e-5, atol=1e-6)
        with open(self.path("ddp.json")) as f, open(self.path("single.json")) as g:
            self.assertEqual([h["tokens"] for h in json.load(f)], [h["tokens"] for h in json.load(g)])

    def test_processes_given_different_settings_refuse_to_start(self):
        # rank 1 with another learning rate would train apart silently; rank 1 not seeing the checkpoint
        # that rank 0 resumes would wait forever
        for case, fields in (("lr", "trainer.learning_rate ("), ("resume", "resumes from, trainer.ckpt_path (")):
            with self.subTest(case):
                ddp = torchrun("disagree", self.dir, case, timeout=120)
                self.assertNotEqual(ddp.returncode, 0)
                self.assertIn(f"processes 0 and 1 differ in {fields}", ddp.stdout + ddp.stderr)

    def test_fsdp_matches_one_process_holds_half_and_resumes_exactly(self):
        for iters in (5, 12):  # the second launch resumes from the first one's checkpoint
            fsdp = torchrun("fsdp", self.dir, iters)
            self.assertEqual(fsdp.returncode, 0, fsdp.stdout[-2000:] + fsdp.stderr[-3000:])
        self.assertIn("resumed from", fsdp.stdout)
        single = run_script("single_gpt", self.dir, 12)
        self.assertEqual(single.returncode, 0, single.stderr)
        sharded, alone = (torch.load(self.path(f), weights_only=True) for f in ("fsdp0.pt", "single_gpt0.pt"))
        self.assertEqual(sharded.keys(), alone.keys())
        for k, v in sharded.items():
            # sums in another order: AdamW divides by sqrt(v), which enlarges the rounding of near-zero gradients
            # into a few % of one step (lr 1e-2) at most
            torch.testing.assert_close(v, alone[k], rtol=1e-4, atol=5e-4)
        with open(self.path("fsdp.json")) as f, open(self.path("single_gpt.json")) as g:
            ours, theirs = json.load(f), json.load(g)
        self.assertEqual([h["tokens"] for h in ours], [h["tokens"] for h in theirs])
        for a, b in zip(ours, theirs):
            self.assertLess(abs(a["loss"] - b["loss"]), 1e-4 * abs(b["loss"]))
        for rank in (0, 1):  # each process stores about half of the weights and of AdamW's two moments
            with open(self.path(f"fsdp{rank}.json")) as f:
                stored = json.load(f)
            self.assertLess(abs(stored["params"] / stored["whole"] - 0.5), 0.05)
            self.assertLess(abs(stored["optimizer"] / (2 * stored["whole"]) - 0.5), 0.05)
        # the checkpoint is the one a single process writes: it resumes without torchrun
        ckpt = load_checkpoint(self.path("fsdp.ckpt"))
        self.assertEqual(set(ckpt["optimizer"]["state"]), set(range(len(ckpt["optimizer"]["state"]))))
        GPT.from_checkpoint(ckpt)

    def test_a_killed_fsdp_rank_restarts_and_resumes_to_the_same_weights(self):
        fsdp = torchrun("fsdp_elastic", self.dir, 10, 4, restarts=1, timeout=300)
        self.assertEqual(fsdp.returncode, 0, fsdp.stdout[-2000:] + fsdp.stderr[-3000:])
        self.assertIn("resumed from", fsdp.stdout)
        fsdp = torchrun("fsdp", self.dir, 10)
        self.assertEqual(fsdp.returncode, 0, fsdp.stderr[-3000:])
        killed, straight = (torch.load(self.path(f), weights_only=True) for f in ("fsdp_elastic0.pt", "fsdp0.pt"))
        for k, v in straight.items():
            self.assertTrue(torch.equal(v, killed[k]), k)

    def test_a_killed_rank_restarts_and_resumes_to_the_same_weights(self):
        ddp = torchrun("elastic", self.dir, 10, 4, restarts=1)
        self.assertEqual(ddp.returncode, 0, ddp.stdout[-2000:] + ddp.stderr[-3000:])
        self.assertIn("resumed from", ddp.stdout)  # the second attempt continued the first one's checkpoint
        single = run_script("single", self.dir, 10)
        self.assertEqual(single.returncode, 0, single.stderr)
        rank0, alone = (torch.load(self.path(f), weights_only=True) for f in ("elastic0.pt", "single0.pt"))
        for k, v in rank0.items():
            torch.testing.assert_close(v, alone[k], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
