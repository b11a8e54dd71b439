"""Exercise the GPU-only training paths once and print a compact report.

Run through ``scripts/gpu_check.sh`` on a machine with CUDA. It needs torch, transformers, peft and
accelerate (and the ``tokenizers`` library transformers brings); trl, bitsandbytes and flash-attn
are optional and reported when absent. Nothing is downloaded: the model is the project's
``bench``-sized random Llama, built locally by ``workers/training/tiny_model.py``.

The "project recipe" sections run the real training subprocess (``python -m workers.training.run``
with trl's SFT and DPO trainers) on that model. trl and ``datasets`` are not on the GPU machine
and it has no network: ``--fetch-wheels DIR`` (on a development machine) downloads them and their
dependencies as CPython 3.12 wheels, slimmed to fit the 64 MiB the tree travels in, and
``gpu_check.sh`` installs those that the machine lacks into a scratch folder.

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
import re
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
Result = dict[str, Any]

# What ``python -m workers.training.run`` needs beyond the GPU machine's torch, peft and accelerate,
# pinned to the development venv's versions. REQUIRED are asked of pip's resolver by
# gpu_check.sh; the rest are their dependencies, installed only where the machine lacks them or
# has a version that does not fit. transformers comes along because the recipe passes
# ``activation_checkpointing`` to the trainer, which the machine's transformers 5.17 does not
# know (5.24 does; 5.17 calls it ``gradient_checkpointing``). huggingface_hub 1.33: datasets asks
# >= 1.31, and a machine whose transformers is 5.17 has a 1.x. bitsandbytes is for QLoRA
# (quantization "4bit"), slimmed to its CUDA 13 libraries below.
REQUIRED = ("trl==1.16.0", "datasets==5.2.0", "transformers==5.24.0")
CARRIED = (
    *REQUIRED,
    "bitsandbytes==0.50.2",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "xxhash==4.1.0",
    "fsspec==2026.9.0",
    "huggingface_hub==1.33.0",
)
# datasets' and trl's pyarrow and pandas (with pandas's python-dateutil and six): the lent GPU
# machine has them (pyarrow 25.0.1, pandas 3.0.6, seen on 2026-11-28), so they stay home by
# default (~42 MiB); ``--with-arrow`` fetches them too, for a machine without them.
ARROW = ("pyarrow==26.0.1", "pandas==3.1.1", "python-dateutil==2.9.0.post0", "six==1.17.0")
# Files left out of the carried wheels: pyarrow's Flight RPC and S3 libraries, C++ headers and
# sources, tests and duplicate copies of its shared libraries (the loader uses the ``.so.NNNN``
# soname); pandas's test suite. Nothing on the recipe's path (datasets.Dataset.from_dict, trl)
# loads them; the pyarrow wheel drops from 55 to ~34 MB. bitsandbytes: its libraries for CUDA 11
# and 12, ROCm and XPU (it loads the one for torch's CUDA runtime, 13.0 on the lent machine, and
# keeps cuda130, cuda132 and cpu here): 41 MiB -> ~7.5 MiB. A machine whose torch is built for
# CUDA 12 needs the unslimmed wheel.
PRUNED = {
    "pyarrow": re.compile(
        r"pyarrow/(include|src|tests|includes)/"
        r"|pyarrow/.*\.(pyx|pxd|pxi|h|cc)$"
        r"|pyarrow/(lib)?_?arrow_(python_)?flight[^/]*$|pyarrow/_flight\.[^/]*$"
        r"|pyarrow/libarrow_s3\.[^/]*$|pyarrow/_s3fs\.[^/]*$|pyarrow/_pyarrow_cpp_tests\.[^/]*$"
        r"|pyarrow/libarrow_python(_parquet_encryption)?\.so(\.\d+\.\d+\.\d+)?$"
    ),
    "pandas": re.compile(r"pandas/tests/"),
    "bitsandbytes": re.compile(
        r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.(so|dll|dylib)$"
    ),
}
# The sections ``--only`` can pick (environment and the model build always run).
SECTIONS = {
    "matmul": "bf16 matmul peak",
    "attention": "attention backends",
    "lora": "LoRA training",
    "packing": "packed sequences",
    "kernels": "SDPA kernels",
    "sft-packed": "project recipe: SFT packed",
    "sft-padded": "project recipe: SFT padded",
    "dpo": "project recipe: DPO",
    "qlora": "project recipe: QLoRA",
    "peft-qlora": "QLoRA",
}

# The recipe subprocess: ``workers.training.run.main`` unchanged, with a watcher around
# ``model.load_base_model`` (what the loaded base is made of) and the process's peak CUDA memory
# at the end, both as one tagged JSON line on stderr each. recipe.py imports load_base_model when
# run.main first imports it, after the patch.
PROBE_TAG = "GPU_CHECK_PROBE "
PROBE = f"""
import json, sys
import workers.training.run as run
import workers.training.model as model

TAG = {PROBE_TAG!r}
load = model.load_base_model


def watched(spec, runtime):
    base = load(spec, runtime)
    kinds, quant, linear = {{}}, set(), 0
    for module in base.modules():
        name = type(module).__name__
        if name in ("Linear4bit", "Linear8bitLt"):
            kinds[name] = kinds.get(name, 0) + 1
            state = getattr(module.weight, "quant_state", None)
            kind = getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "?")
            quant.add(str(kind))
            storage = str(module.weight.dtype).removeprefix("torch.")
        elif name == "Linear":
            linear += 1
    seen = dict(kinds)
    seen["plain Linear"] = linear
    if kinds:
        seen["quant types"] = sorted(quant)
        seen["stored as"] = storage
        config = getattr(base.config, "quantization_config", None)
        seen["compute dtype"] = str(getattr(config, "bnb_4bit_compute_dtype", None))
    seen["footprint MiB"] = round(base.get_memory_footprint() / 2**20, 1)
    print(TAG + json.dumps({{"base model": seen}}), file=sys.stderr, flush=True)
    return base


model.load_base_model = watched
code = run.main()
import torch
if torch.cuda.is_available() and torch.cuda.is_initialized():
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(TAG + json.dumps({{"peak memory GiB": round(peak, 2)}}), file=sys.stderr, flush=True)
sys.exit(code)
"""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(Path(args.fetch_wheels), args.wheel_python, arrow=args.with_arrow)
    report: Result = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    began = time.perf_counter()
    _section(report, "environment", lambda: _environment())

    device = _pick_device(args.device)
    if device is None:
        print("no CUDA: skipping GPU checks")
        report["skipped"] = "no CUDA"
        return _finish(report, began)

    ctx = _Context(args, device)
    runs: dict[str, Callable[[], Result]] = {
        "matmul": ctx.matmul_peak,
        "attention": ctx.attention_backends,
        "lora": ctx.lora_training,
        "packing": ctx.packing,
        "kernels": ctx.sdpa_kernels,
        "sft-packed": lambda: ctx.recipe("sft", packing=True),
        "sft-padded": lambda: ctx.recipe("sft", packing=False),
        "dpo": lambda: ctx.recipe("dpo", packing=False),
        "qlora": ctx.recipe_qlora,
        "peft-qlora": ctx.qlora,
    }
    chosen = args.only or list(SECTIONS)
    if "matmul" in chosen:
        _section(report, SECTIONS["matmul"], runs["matmul"])
    _section(report, "build bench model", ctx.build_model)
    for key in SECTIONS:
        if key != "matmul" and key in chosen:
            _section(report, SECTIONS[key], runs[key])
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
    parser.add_argument(
        "--recipe-steps", type=int, default=40, help="optimizer steps of the packed SFT recipe run"
    )
    parser.add_argument(
        "--recipe-examples", type=int, default=32, help="SFT examples (DPO pairs: half) per step"
    )
    parser.add_argument(
        "--recipe-timeout",
        type=float,
        default=120.0,
        help="seconds one recipe subprocess may run before it is killed",
    )
    parser.add_argument(
        "--qlora-recipe-steps",
        type=int,
        default=25,
        help="optimizer steps of the QLoRA recipe run (packed SFT, quantization 4bit)",
    )
    parser.add_argument(
        "--qlora-timeout",
        type=float,
        default=120.0,
        help="seconds the QLoRA recipe subprocess may run before it is killed",
    )
    parser.add_argument(
        "--only",
        type=_section_keys,
        metavar="KEYS",
        help="comma-separated sections to run besides the environment and the model build: "
        + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--fetch-wheels",
        metavar="DIR",
        help="download the wheels the recipe needs on the GPU machine into DIR, and stop",
    )
    parser.add_argument(
        "--wheel-python", default="3.12", help="CPython version of the GPU machine's python"
    )
    parser.add_argument(
        "--with-arrow",
        action="store_true",
        help="--fetch-wheels: also fetch pyarrow and pandas (for a machine that lacks them)",
    )
    return parser.parse_args(argv)


def _section_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}"
        )
    return keys


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
        path.parent.mkdir(parents=True, exist_ok=True)
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
    # The recipe's other imports: where a carried wheel was installed, the version is the
    # carried one and gpu_check.sh names it in $GPU_CHECK_CARRIED.
    for name in ("datasets", "pyarrow", "pandas", "numpy", "huggingface_hub", "fsspec"):
        _say(result, name, _version(name))
    _say(result, "carried wheels installed", os.environ.get("GPU_CHECK_CARRIED") or "none")
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


def fetch_wheels(dest: Path, python_version: str, *, arrow: bool = False) -> int:
    """Download CARRIED (and ARROW) as manylinux x86_64 wheels for CPython ``python_version``,
    slimmed; wheels of other projects left in ``dest`` from an earlier fetch are removed."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [*CARRIED, *(ARROW if arrow else ())]
    projects = {_project(r.split("==")[0]) for r in wanted}
    for old in dest.glob("*.whl"):
        if _project(old.name.split("-")[0]) not in projects:
            print(f"removed  {old.name}")
            old.unlink()
    platforms = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64"]
    platforms.append("manylinux_2_28_x86_64")  # bitsandbytes 0.50 is tagged manylinux_2_24
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", python_version, "-d", str(dest)]
    for name in platforms:
        command += ["--platform", name]
    subprocess.run([*command, *wanted], check=True)
    (dest / "requirements.txt").write_text("".join(f"{r}\n" for r in REQUIRED))
    for wheel in sorted(dest.glob("*.whl")):
        pattern = PRUNED.get(wheel.name.split("-")[0].lower())
        if pattern is not None:
            _prune_wheel(wheel, pattern)
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in dest.glob("*.whl")) / 2**20
    print(f"{total:6.1f} MiB  in all (the tree travels in 64 MiB with them)")
    return 0


def _project(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427): huggingface-hub, six."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _prune_wheel(wheel: Path, pattern: re.Pattern[str]) -> None:
    """Rewrite ``wheel`` without the files ``pattern`` matches (RECORD edited to match)."""
    slim = wheel.with_suffix(".slim")
    with (
        zipfile.ZipFile(wheel) as src,
        zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, True, 9) as out,
    ):
        kept = [i for i in src.infolist() if not pattern.search(i.filename)]
        if len(kept) == len(src.infolist()):
            slim.unlink()
            return
        names = {i.filename for i in kept}
        for info in kept:
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = (
                    "\n".join(
                        x for x in lines if x.split(",")[0] in names or x.endswith("RECORD,,")
                    )
                    + "\n"
                ).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    slim.replace(wheel)


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


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

    def sdpa_kernels(self) -> Result:
        """Which SDPA backend runs forward and backward for each attention layout the recipe uses.

        Read from the profiler's aten op names (``_scaled_dot_product_flash_attention``,
        ``_efficient_``, ``_cudnn_``, ``_attention_math``), which name the backend on CPU and CUDA.
        """
        import torch

        sys.path.insert(0, str(REPO_ROOT))
        from workers.training.attention import NAME as VARLEN
        from workers.training.attention import register

        register()
        result: Result = {}
        lengths = (96, 160, 64, 200) if self.cuda else (24, 40, 16)
        seqs = [self._random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
        total = sum(lengths)
        packed = torch.cat(seqs)[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(self.device)
        segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        allowed = (segment[:, None] == segment[None, :]) & torch.ones(total, total).tril().bool()
        mask = torch.zeros(1, 1, total, total, dtype=self.dtype)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min).to(self.device)
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        longest = max(lengths)
        padded = torch.zeros(len(seqs), longest, dtype=torch.long, device=self.device)
        attention = torch.zeros_like(padded)
        for row, ids in enumerate(seqs):
            padded[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
        layouts: list[tuple[str, str, dict[str, Any]]] = [
            (
                "packed, sdpa_varlen (recipe SFT)",
                VARLEN,
                {
                    "input_ids": packed,
                    "position_ids": positions,
                    "cu_seq_lens_q": bounds.to(self.device),
                    "cu_seq_lens_k": bounds.to(self.device),
                    "max_length_q": longest,
                    "max_length_k": longest,
                },
            ),
            (
                "packed, sdpa + 4-D mask",
                "sdpa",
                {"input_ids": packed, "position_ids": positions, "attention_mask": mask},
            ),
            (
                "padded, sdpa (recipe padded SFT, DPO)",
                "sdpa",
                {"input_ids": padded, "attention_mask": attention},
            ),
            ("unpadded, sdpa causal", "sdpa", {"input_ids": padded}),
        ]
        for name, impl, inputs in layouts:
            try:
                _say(result, name, self._attention_ops(impl, inputs))
            except Exception as exc:  # one layout failing must not hide the others
                _say(result, name, f"failed: {type(exc).__name__}: {exc}")
                result["status"] = "failed"
        if self.cuda:
            _say(result, "per-example loop, 3 x 32 new lengths, fwd+bwd", self._loop_timing())
        return result

    def _loop_timing(self) -> str:
        """What sdpa_varlen's loop costs on each backend when every example brings a new length."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        generator = torch.Generator().manual_seed(5)
        lengths = torch.randint(16, 500, (3 * 32,), generator=generator).tolist()
        shown = []
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            try:
                self._sync()
                began = time.perf_counter()
                with sdpa_kernel([backend]):
                    for n in lengths:
                        q = torch.randn(1, 8, n, 64, device=self.device, dtype=self.dtype)
                        k, v = (
                            torch.randn(1, 4, n, 64, device=self.device, dtype=self.dtype)
                            for _ in range(2)
                        )
                        q.requires_grad_()
                        F.scaled_dot_product_attention(
                            q, k, v, is_causal=True, enable_gqa=True
                        ).sum().backward()
                self._sync()
                shown.append(f"{backend.name} {1000 * (time.perf_counter() - began):.0f} ms")
            except RuntimeError as exc:
                shown.append(f"{backend.name} unusable ({str(exc)[:60]})")
        return ", ".join(shown)

    def _attention_ops(self, impl: str, inputs: dict[str, Any]) -> str:
        import torch
        from torch.profiler import ProfilerActivity, profile

        model = self._load(impl)
        model.train()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        model(**inputs).logits.float().mean().backward()  # warm-up: lazy inits stay out
        model.zero_grad(set_to_none=True)
        with profile(activities=activities) as prof:
            model(**inputs).logits.float().mean().backward()
            self._sync()
        counts: Counter[str] = Counter()
        kernels: Counter[str] = Counter()
        for event in prof.events():
            name = event.name
            if name.startswith(
                (
                    "aten::_scaled_dot_product",
                    "aten::_flash_attention",
                    "aten::_efficient_attention",
                    "aten::_cudnn_attention",
                )
            ):
                counts[name.removeprefix("aten::")] += 1
            elif (
                self.cuda
                and event.device_type == torch.autograd.DeviceType.CUDA
                and re.search(r"flash|fmha|cutlass.*attention|sdpa|attn", name, re.IGNORECASE)
            ):
                kernels[name[:60]] += 1
        shown = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "no SDPA op"
        if kernels:
            shown += "; kernels: " + ", ".join(f"{n} x{c}" for n, c in kernels.most_common(3))
        del model
        return shown

    def recipe_qlora(self) -> Result:
        """The recipe with quantization "4bit" (QLoRA, NF4 base via bitsandbytes), packed SFT."""
        if not self.cuda:
            print("   skipped: no CUDA (QLoRA needs a CUDA GPU)")
            return {"status": "skipped", "reason": "no CUDA"}
        bnb = _version("bitsandbytes", try_import=True)
        if not bnb[:1].isdigit() or "import fails" in bnb:
            print(f"   skipped: bitsandbytes {bnb}")
            return {"status": "skipped", "reason": f"bitsandbytes {bnb}"}
        return self.recipe(
            "sft",
            packing=True,
            quantization="4bit",
            steps=self.args.qlora_recipe_steps,
            timeout=self.args.qlora_timeout,
        )

    def recipe(
        self,
        method: str,
        *,
        packing: bool,
        quantization: str = "none",
        steps: int | None = None,
        timeout: float | None = None,
    ) -> Result:
        """``python -m workers.training.run SPEC.json`` on the built model, as a worker runs it.

        The subprocess is the recipe's own entry point, run under PROBE, which only watches: it
        reports the peak CUDA memory of the process and what the loaded base model is made of
        (4-bit layers, quantization type, memory footprint) on stderr.
        """
        if self.model_dir is None:
            raise RuntimeError("the model was not built (see 'build bench model')")
        missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"   skipped: {', '.join(missing)} not importable (see gpu_check.sh)")
            return {"status": "skipped", "reason": f"{', '.join(missing)} absent"}
        sys.path.insert(0, str(REPO_ROOT))
        from common.datasets import DatasetFormat
        from workers.training.data import tokenize_to_file
        from workers.training.spec import TrainingSpec

        work = Path(self._tmp.name) / f"recipe-{method}-{'packed' if packing else 'padded'}"
        if quantization != "none":
            work = work.with_name(f"{work.name}-{quantization}")
        work.mkdir()
        sft = method == "sft"
        per_step = self.args.recipe_examples if sft else max(2, self.args.recipe_examples // 4)
        if steps is None:
            steps = (
                self.args.recipe_steps if sft and packing else max(4, self.args.recipe_steps // 3)
            )
        timeout = timeout or self.args.recipe_timeout
        # QLoRA's done event also carries the parity sample, generated on the 4-bit base.
        parity = [{"role": "user", "content": "What happens next?"}]
        # DPO sees the same pairs every step: its loss on them must fall from log 2.
        records = self._chat_records(per_step * steps if sft else per_step, method)
        data = work / "train.safetensors"
        tokenized = tokenize_to_file(
            ((DatasetFormat.CHAT if sft else DatasetFormat.DPO, r) for r in records),
            self.model_dir,
            data,
            method="sft" if sft else "dpo",
            max_seq_len=1024,
        )
        spec = TrainingSpec(
            method=method,
            base_model_path=str(self.model_dir),
            base_model_name="loraplex/bench",
            train_data=str(data),
            output_dir=str(work / "adapter"),
            checkpoint_dir=str(work / "checkpoints"),
            n_epochs=1000,
            max_steps=steps,
            batch_size=per_step,
            learning_rate=1e-3 if sft else 5e-4,
            warmup_ratio=0.0,
            max_seq_len=1024,
            packing=packing,
            logging_steps=1,
            dtype="auto",
            quantization=quantization,
            parity_messages=parity if quantization != "none" else None,
            parity_max_tokens=8,
        )
        spec_path = spec.save(work / "spec.json")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        began = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-c", PROBE, str(spec_path)],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            stdout, stderr, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            code = f"killed after {timeout:.0f} s"
        wall = time.perf_counter() - began
        probed: Result = {}
        for line in stderr.splitlines():
            if line.startswith(PROBE_TAG):
                probed.update(json.loads(line.removeprefix(PROBE_TAG)))
        events = []
        for line in stdout.splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        kinds = Counter(e.get("type") for e in events)
        losses: list[Any] = []
        metrics = [e for e in events if e.get("type") == "metrics"]
        started = next((e for e in events if e.get("type") == "started"), {})
        finished = next((e for e in events if e.get("type") in ("done", "error")), {})

        result: Result = {}
        _say(
            result,
            "data",
            f"{tokenized.examples} {'examples' if sft else 'pairs'}, "
            f"{per_step} per step, {steps} steps",
        )
        _say(result, "exit", code)
        _say(result, "events", dict(kinds))
        _say(
            result,
            "started",
            {k: started.get(k) for k in ("device", "dtype", "attn", "total_steps")},
        )
        if metrics:
            losses = [m.get("train_loss") for m in metrics]
            speeds = sorted(
                m["tokens_per_second"] for m in metrics[1:] if m.get("tokens_per_second")
            )
            _say(result, "loss first -> last", [_round(losses[0]), _round(losses[-1])])
            if speeds:
                _say(
                    result,
                    "tokens/s median (after step 1)",
                    round(speeds[len(speeds) // 2]),
                    f"{speeds[len(speeds) // 2]:,.0f}",
                )
        if "base model" in probed:
            _say(result, "base model", probed["base model"])
        if "peak memory GiB" in probed:
            _say(result, "peak memory GiB", probed["peak memory GiB"])
        if finished.get("type") == "done":
            _say(result, "done metrics", finished.get("metrics"))
            _say(result, "adapter", self._check_adapter(Path(spec.output_dir)))
            if finished.get("parity"):
                answer = finished["parity"]
                _say(
                    result,
                    "parity sample",
                    f"{len(answer.get('token_ids', []))} tokens, {answer.get('text', '')!r}"[:120],
                )
        elif finished:
            _say(result, "error", finished.get("message"))
        _say(result, "wall seconds", round(wall, 1))
        quantized = probed.get("base model", {})
        ok = (
            code == 0
            and finished.get("type") == "done"
            and started.get("device") == self.device.type
            and len(metrics) == steps
            and all(isinstance(v, float) for v in losses)
            and losses[-1] < losses[0]
            and str(result.get("adapter", "")).startswith("ok")
            and (
                quantization != "4bit"
                or (
                    quantized.get("Linear4bit", 0) > 0
                    and quantized.get("quant types") == ["nf4"]
                    and bool(finished.get("parity"))
                )
            )
        )
        if not ok:
            result["status"] = "failed"
            print("   FAILED; stderr tail:")
            for line in stderr.rstrip().splitlines()[-12:]:
                print(f"   | {line[:200]}")
        return result

    def _chat_records(self, count: int, method: str) -> list[dict[str, Any]]:
        """Chat examples cut from the shipped corpus: varied lengths, a learnable continuation."""
        import random

        text = (REPO_ROOT / "workers" / "training" / "assets" / "tiny_corpus.txt").read_text()
        sentences = [s.strip() + "." for s in text.replace("\n", " ").split(". ") if s.strip()]
        rng = random.Random(3)
        records: list[dict[str, Any]] = []
        for _ in range(count):
            start = rng.randrange(len(sentences) - 12)
            asked = rng.randint(1, 3)
            answered = rng.randint(1, 8)
            prompt = " ".join(sentences[start : start + asked]) + " What happens next?"
            answer = " ".join(sentences[start + asked : start + asked + answered])
            user = [{"role": "user", "content": prompt}]
            if method == "sft":
                records.append({"messages": [*user, {"role": "assistant", "content": answer}]})
            else:
                other = " ".join(rng.sample(sentences, answered))
                records.append(
                    {
                        "input": {"messages": user},
                        "preferred_output": [{"role": "assistant", "content": answer}],
                        "non_preferred_output": [{"role": "assistant", "content": other}],
                    }
                )
        return records

    def _check_adapter(self, folder: Path) -> str:
        """The adapter folder holds adapter_config.json + adapter_model.safetensors, loadable."""
        import torch
        from safetensors.torch import load_file

        names = sorted(p.name for p in folder.iterdir())
        if names != ["adapter_config.json", "adapter_model.safetensors"]:
            return f"unexpected files {names}"
        weights = load_file(str(folder / "adapter_model.safetensors"))
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
        finite = all(bool(torch.isfinite(t).all()) for t in weights.values())
        config = json.loads((folder / "adapter_config.json").read_text())
        size = (folder / "adapter_model.safetensors").stat().st_size / 2**20
        return (
            f"{'ok' if finite else 'NOT FINITE'}: safetensors, {len(weights)} tensors "
            f"({', '.join(dtypes)}, {size:.1f} MiB), base {config.get('base_model_name_or_path')}"
        )

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
