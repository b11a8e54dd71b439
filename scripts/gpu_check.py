"""Exercise the GPU-only training paths once and print a compact report.

Run through ``scripts/gpu_check.sh`` on a machine with CUDA. It needs torch, transformers, peft and
accelerate (and the ``tokenizers`` library transformers brings); trl, bitsandbytes and flash-attn
are optional and reported when absent. Nothing is downloaded: the model is the project's
``bench``-sized random Llama, built locally by ``workers/training/tiny_model.py``.

Each section runs in its own try/except so one failure does not hide the others. With ``$OUT`` set
the same results are written to ``$OUT/gpu_check.json``. Without CUDA the script prints what it can
and stops ("no CUDA: skipping GPU checks"); ``--device cpu`` runs every section on the CPU with
small sizes, which is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
Result = dict[str, Any]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    report: Result = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    began = time.perf_counter()
    _section(report, "environment", lambda: _environment())

    device = _pick_device(args.device)
    if device is None:
        print("no CUDA: skipping GPU checks")
        report["skipped"] = "no CUDA"
        return _finish(report, began)

    ctx = _Context(args, device)
    _section(report, "bf16 matmul peak", ctx.matmul_peak)
    _section(report, "build bench model", ctx.build_model)
    _section(report, "attention backends", ctx.attention_backends)
    _section(report, "LoRA training", ctx.lora_training)
    _section(report, "packed sequences", ctx.packing)
    _section(report, "QLoRA", ctx.qlora)
    return _finish(report, began)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: CUDA when present, else stop after the environment section",
    )
    parser.add_argument("--preset", default="bench", help="tiny_model preset to build")
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--matmul-size", type=int, default=8192, help="n for an n*n*n matmul")
    parser.add_argument("--qlora-steps", type=int, default=5, help="steps of the QLoRA check")
    return parser.parse_args(argv)


def _pick_device(choice: str) -> Any:
    import torch

    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        print("--device cuda asked for, but torch sees no CUDA device")
    return None


def _section(report: Result, name: str, fn: Callable[[], Result]) -> None:
    print(f"== {name}", flush=True)
    began = time.perf_counter()
    try:
        result = fn()
        result.setdefault("status", "ok")
    except Exception as exc:  # one broken section must not hide the rest
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        print(f"   FAILED {result['error']}")
        for line in traceback.format_exc().rstrip().splitlines()[-6:]:
            print(f"   | {line}")
    result["seconds"] = round(time.perf_counter() - began, 2)
    report["sections"][name] = result
    sys.stdout.flush()


def _say(result: Result, key: str, value: Any, shown: str | None = None) -> None:
    result[key] = value
    print(f"   {key}: {shown if shown is not None else value}")


def _finish(report: Result, began: float) -> int:
    report["seconds"] = round(time.perf_counter() - began, 1)
    statuses = [s.get("status") for s in report["sections"].values()]
    failed = statuses.count("failed")
    print(
        f"== done in {report['seconds']} s: {statuses.count('ok')} ok, "
        f"{statuses.count('skipped')} skipped, {failed} failed"
    )
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_check.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"   json: {path}")
    return 1 if failed else 0


def _version(name: str, *, try_import: bool = False) -> str:
    """The installed version of a distribution, or "absent"; optionally check it imports too."""
    module = name.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        return "absent"
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "present"
    if try_import:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install is a finding, not a crash
            return f"{version} but import fails ({type(exc).__name__}: {exc})"
    return version


def _environment() -> Result:
    import torch

    result: Result = {}
    _say(result, "python", platform.python_version())
    _say(result, "torch", torch.__version__)
    _say(result, "cuda runtime", torch.version.cuda)
    for name in ("transformers", "tokenizers", "peft", "accelerate", "trl"):
        _say(result, name, _version(name))
    _say(result, "flash_attn", _version("flash_attn", try_import=True))
    _say(result, "bitsandbytes", _version("bitsandbytes", try_import=True))
    _say(result, "cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        _say(result, "device", f"{props.name}, {props.total_memory / 2**30:.1f} GiB")
        _say(result, "capability", f"sm_{props.major}{props.minor}")
        _say(result, "multiprocessors", props.multi_processor_count)
        _say(result, "bf16 supported", torch.cuda.is_bf16_supported())
        _say(result, "nvidia-smi", _nvidia_smi())
    return result


def _nvidia_smi() -> str:
    try:
        done = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    return done.stdout.strip() or done.stderr.strip()


def _load_builder() -> ModuleType:
    # Loaded by file path, not as a package: the worker package's __init__ may import things
    # (trl, celery) that the GPU machine lacks, and the builder needs none of them.
    path = REPO_ROOT / "workers" / "training" / "tiny_model.py"
    spec = importlib.util.spec_from_file_location("loraplex_tiny_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Context:
    """State the sections share: the device, the built model folder and the matmul peak."""

    def __init__(self, args: argparse.Namespace, device: Any) -> None:
        import torch

        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.dtype = torch.bfloat16
        self.model_dir: Path | None = None
        self.peak_flops: float | None = None
        self.attn_impl = "sdpa"
        self._tmp = tempfile.TemporaryDirectory(prefix="loraplex-gpu-check-")

    def _sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def matmul_peak(self) -> Result:
        import torch

        n = self.args.matmul_size
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        for _ in range(3):
            a @ b
        self._sync()
        reps = 10 if self.cuda else 3
        began = time.perf_counter()
        for _ in range(reps):
            a @ b
        self._sync()
        seconds = (time.perf_counter() - began) / reps
        self.peak_flops = 2 * n**3 / seconds
        result: Result = {}
        _say(result, "shape", f"{n}x{n}x{n} bf16, mean of {reps}")
        _say(result, "tflops", round(self.peak_flops / 1e12, 1))
        return result

    def build_model(self) -> Result:
        builder = _load_builder()
        began = time.perf_counter()
        self.model_dir = builder.build_tiny_model(
            Path(self._tmp.name) / "model", preset=self.args.preset, seed=0
        )
        marker = json.loads((self.model_dir / builder.MARKER_FILE).read_text())
        result: Result = {}
        shape = (
            f"hidden {marker['hidden_size']}, {marker['num_layers']} layers, "
            f"{marker['num_heads']} heads / {marker['num_kv_heads']} kv, head_dim "
            f"{marker['head_dim']}, vocab {marker['vocab_size']} "
            f"({marker['tokenizer_vocab_size']} learned)"
        )
        _say(result, "preset", self.args.preset)
        _say(result, "shape", shape)
        _say(result, "build seconds", round(time.perf_counter() - began, 1))
        # This machine's transformers may differ from the development one: reload through Auto*.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        prompt = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
            )
        )
        reloaded = f"{type(tokenizer).__name__}, eos {tokenizer.eos_token}, chat template ok"
        if not prompt.endswith("<|im_start|>assistant\n"):
            reloaded = f"{type(tokenizer).__name__}, chat template renders {prompt!r}"
            result["status"] = "failed"
        _say(result, "tokenizer reload", reloaded)
        return result

    def _load(self, attn: str, dtype: Any = None, **kwargs: Any) -> Any:
        from transformers import AutoModelForCausalLM

        if self.model_dir is None:
            raise RuntimeError("the model was not built (see 'build bench model')")
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype or self.dtype, attn_implementation=attn, **kwargs
        )
        return model if "quantization_config" in kwargs else model.to(self.device)

    def _random_ids(self, batch: int, seq: int, seed: int) -> Any:
        import torch

        generator = torch.Generator().manual_seed(seed)
        # ids 0-2 are the special tokens; stay inside the learned vocabulary.
        high = min(1000, self._vocab())
        return torch.randint(3, high, (batch, seq), generator=generator).to(self.device)

    def _vocab(self) -> int:
        assert self.model_dir is not None
        marker = json.loads((self.model_dir / "loraplex_model.json").read_text())
        return int(marker["tokenizer_vocab_size"])

    def attention_backends(self) -> Result:
        import torch

        result: Result = {}
        fa2_version = _version("flash_attn", try_import=True)
        have_fa2 = self.cuda and fa2_version[:1].isdigit() and "import fails" not in fa2_version
        if not have_fa2:
            why = "no CUDA" if not self.cuda else fa2_version
            _say(result, "flash-attn", f"not usable ({why}): FlashAttention-2 not checked")
        ids = self._random_ids(2, 256, seed=1)
        logits: dict[str, Any] = {}
        for impl in ["sdpa", "flash_attention_2"] if have_fa2 else ["sdpa"]:
            try:
                model = self._load(impl)
                with torch.no_grad():
                    out = model(input_ids=ids).logits.float()
            except Exception as exc:  # FA2 refusing this GPU or dtype is a finding
                _say(result, impl, f"failed: {type(exc).__name__}: {exc}")
                continue
            finite = bool(torch.isfinite(out).all())
            loaded = model.config._attn_implementation
            _say(result, impl, f"loaded as {loaded}, forward ok, finite logits={finite}")
            if finite:
                logits[impl] = out
            del model
        if "sdpa" not in logits:
            raise RuntimeError("SDPA, the fallback every worker relies on, did not work")
        if "flash_attention_2" in logits:
            diff = (logits["flash_attention_2"] - logits["sdpa"]).abs().max().item()
            _say(result, "fa2 vs sdpa max logit diff", round(diff, 4))
        # The workers' rule (DESIGN §6): FlashAttention-2 when CUDA and flash-attn are present
        # (and, here, proven to work), SDPA otherwise.
        self.attn_impl = "flash_attention_2" if "flash_attention_2" in logits else "sdpa"
        _say(result, "selected", self.attn_impl)
        return result

    def _corpus_batches(self, count: int) -> list[Any]:
        """Random windows of the shipped corpus, tokenized: a real language-modelling loss."""
        import torch
        from tokenizers import Tokenizer

        assert self.model_dir is not None
        tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        text = (REPO_ROOT / "workers" / "training" / "assets" / "tiny_corpus.txt").read_text()
        tokens = torch.tensor(tokenizer.encode(text).ids)
        generator = torch.Generator().manual_seed(2)
        batch, seq = self.args.batch, self.args.seq
        if len(tokens) <= seq:
            raise RuntimeError(f"corpus has {len(tokens)} tokens, fewer than seq {seq}")
        batches = []
        for _ in range(count):
            starts = torch.randint(0, len(tokens) - seq, (batch,), generator=generator)
            batches.append(torch.stack([tokens[s : s + seq] for s in starts]).to(self.device))
        return batches

    def lora_training(self) -> Result:
        import torch
        from peft import LoraConfig, get_peft_model

        base = self._load(self.attn_impl)
        n_params = sum(p.numel() for p in base.parameters())
        n_matmul = n_params - base.get_input_embeddings().weight.numel()
        config = base.config
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(base, lora)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Kept on the host so that the peak-memory figure is the training step's alone.
        base_before = {
            n: p.detach().to("cpu", copy=True)
            for n, p in model.named_parameters()
            if not p.requires_grad
        }
        lora_b_before = {
            n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n
        }
        optimizer = torch.optim.AdamW(trainable, lr=self.args.lr, fused=self.cuda)
        batches = self._corpus_batches(self.args.steps)

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        losses = []
        began = time.perf_counter()
        for step, ids in enumerate(batches):
            if step == self.args.warmup:
                self._sync()
                began = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        self._sync()
        seconds = time.perf_counter() - began
        timed_steps = max(1, len(batches) - self.args.warmup)
        tokens_per_s = timed_steps * self.args.batch * self.args.seq / seconds
        loss_values = [float(v) for v in losses]

        result: Result = {}
        _say(result, "params", n_params, f"{n_params / 1e6:.1f} M base")
        _say(result, "trainable", sum(p.numel() for p in trainable))
        _say(result, "batch", f"{self.args.batch} x {self.args.seq}, {len(batches)} steps")
        _say(result, "attn", model.config._attn_implementation)
        _say(result, "adapter dtype", str(trainable[0].dtype), None)
        _say(result, "loss first -> last", [round(loss_values[0], 3), round(loss_values[-1], 3)])
        _say(result, "tokens/s", round(tokens_per_s), f"{tokens_per_s:,.0f}")
        _say(result, "step ms", round(1000 * seconds / timed_steps, 1))
        # Model FLOPs per token, the usual convention: 6 per matmul weight (forward and both
        # backward products) plus causal attention's scores and values. LoRA skips the base
        # weights' gradient products, so the hardware does about 2/3 of this.
        flops_per_token = (
            6 * n_matmul
            + 12
            * config.num_hidden_layers
            * (config.num_attention_heads * config.head_dim)
            * self.args.seq
        )
        achieved = flops_per_token * tokens_per_s
        _say(result, "model tflops", round(achieved / 1e12, 2))
        if self.peak_flops:
            _say(result, "MFU vs measured matmul peak", f"{100 * achieved / self.peak_flops:.1f}%")
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            _say(result, "peak memory GiB", round(peak, 2))
        moved = sum(
            not torch.equal(p.detach(), lora_b_before[n])
            for n, p in model.named_parameters()
            if n in lora_b_before
        )
        unchanged = all(
            torch.equal(p.detach().cpu(), base_before[n])
            for n, p in model.named_parameters()
            if n in base_before
        )
        _say(result, "lora_B moved", f"{moved}/{len(lora_b_before)}")
        _say(result, "base weights unchanged", unchanged)
        finite = all(v == v and abs(v) != float("inf") for v in loss_values)
        if not (finite and moved == len(lora_b_before) and unchanged):
            result["status"] = "failed"
            print("   FAILED: loss not finite, LoRA weights still, or base weights changed")
        return result

    def packing(self) -> Result:
        """Three sequences packed in one row must give the logits they give alone."""
        import torch

        result: Result = {}
        lengths = (96, 160, 64) if self.cuda else (24, 40, 16)
        seqs = [self._random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
        variants = [("sdpa", torch.bfloat16), ("sdpa", torch.float32), ("eager", torch.float32)]
        if self.attn_impl == "flash_attention_2":
            variants.insert(0, ("flash_attention_2", torch.bfloat16))
        for impl, dtype in variants:
            name = f"{impl} {str(dtype).removeprefix('torch.')}"
            try:
                diff, leak = self._packed_vs_alone(impl, dtype, seqs)
            except Exception as exc:  # one backend failing must not hide the others
                _say(result, name, {"error": f"{type(exc).__name__}: {exc}"})
                result["status"] = "failed"
                continue
            shown = f"max logit diff {diff:.2e}"
            if leak is not None:
                shown += f" (without the 4-D mask: {leak:.2e})"
            _say(result, name, {"packed_vs_alone": diff, "no_mask": leak}, shown)
        return result

    def _packed_vs_alone(
        self, impl: str, dtype: Any, seqs: list[Any]
    ) -> tuple[float, float | None]:
        """Max logit difference packed vs alone, and the same without the 4-D mask (None: FA2)."""
        import torch

        lengths = [len(s) for s in seqs]
        packed = torch.cat(seqs)[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(self.device)
        segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        total = len(segment)
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        allowed = (segment[:, None] == segment[None, :]) & causal
        model = self._load(impl, dtype=dtype)
        with torch.no_grad():
            alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs]).float()
            if impl == "flash_attention_2":
                # FA2 separates sequences by the restarted position_ids (its varlen kernel).
                packed_logits = model(input_ids=packed, position_ids=positions).logits[0]
                return (packed_logits.float() - alone).abs().max().item(), None
            mask = torch.zeros(1, 1, total, total, dtype=dtype)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min).to(self.device)
            packed_logits = model(
                input_ids=packed, position_ids=positions, attention_mask=mask
            ).logits[0]
            unmasked = model(input_ids=packed, position_ids=positions).logits[0]
        diff = (packed_logits.float() - alone).abs().max().item()
        leak = (unmasked.float() - alone).abs().max().item()
        return diff, leak

    def qlora(self) -> Result:
        result: Result = {}
        if not self.cuda:
            print("   QLoRA: skipped (needs CUDA)")
            return {"status": "skipped", "reason": "needs CUDA"}
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # absent or broken: either way QLoRA cannot be checked
            print("   QLoRA: skipped (bitsandbytes not present on this machine)")
            return {"status": "skipped", "reason": f"bitsandbytes: {type(exc).__name__}: {exc}"}
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        torch.cuda.reset_peak_memory_stats()
        base = self._load("sdpa", quantization_config=quant, device_map={"": 0})
        base = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            base, use_gradient_checkpointing=False
        )
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=self.args.lr
        )
        losses = []
        for ids in self._corpus_batches(self.args.qlora_steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 3))
        _say(result, "bitsandbytes", _version("bitsandbytes"))
        _say(result, "losses", losses)
        _say(result, "peak memory GiB", round(torch.cuda.max_memory_allocated() / 2**30, 2))
        return result


if __name__ == "__main__":
    sys.exit(main())
