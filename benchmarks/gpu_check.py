"""The GPU check: one short script for a scarce GPU reservation, built to survive its own failures.

Stages, each a process of its own under its own time limit, inside one global deadline (`--plan` prints
them). The JSON is rewritten after every stage with its status, error and log tail, and a failed stage does
not stop the ones after it, except the smoke stage: if the machine cannot run tlnlp at all, nothing can.

  smoke            versions, GPU, bf16, cores, /dev/shm, unmet requirements; the bf16 GEMM ceiling (8192^3, 10
                   timed products); imports every tlnlp module; 20 eager BERT-base steps fed by loader
                   workers; one compiled forward and backward of a tiny model.
  step_vs_stock    bench_mlm.py: tlnlp's MLM step against the stock one, alone, at BERT-base size in bf16,
                   and a check that both compute the same loss.
  stage1_tlnlp     the real scripts/pretrain_mlm.py at BERT-base size on wiki-leads (no evaluation until
  stage1_stock     the end, so the timed log windows hold training only): tlnlp's run, the stock recipe in
  stage1_compiled  the same loop (--sparse_mlm_head false), and tlnlp with --torch_compile. Tokens/s (median
                   window and whole run), MFU and HFU against the data-sheet peak and the measured GEMM
                   ceiling, time to the first step, peak memory, data waiting, the loss curve, and for the
                   compiled run its graph breaks and graphs.
  thesis           transfer beats scratch, on the GPU: about a minute of stage 1 (a 4-layer encoder, the MiniLM
                   tokenizer), then 1,000 wiki-topics labels fine-tuned from it and from its from-scratch twin.

    bash benchmarks/gpu_check.sh --bundle .gpu-bundle --output OUT     # on the GPU node (make gpu-bundle here)
    bash benchmarks/gpu_check.sh --dry --output OUT                    # anywhere: a tiny model, on the CPU too
    bash benchmarks/gpu_check.sh --plan                                # the stages' time limits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# tlnlp from this working tree, in this process and in every stage and script it starts, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(REPO))
VOCAB = 30522  # the MiniLM (BERT uncased) tokenizer's vocabulary

# Seconds each stage may run on the GPU. The total is the global deadline: at most 7 minutes, so that one
# rerun fits a 15-minute reservation with the machine's start-up.
LIMITS = {"smoke": 60, "step_vs_stock": 40, "stage1_tlnlp": 50, "stage1_stock": 40, "stage1_compiled": 90,
          "thesis": 140}
DRY_SLOWDOWN = 4  # --dry runs the same stages on a CPU: a tiny model, but process start-up and compilation
# cost more there.
# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets; the longest matching
# name wins ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "GH200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "B200": 2250e12,
                   "MI300X": 1307e12}


def peak_flops(device_name: str) -> tuple[str | None, float | None]:
    """The data-sheet entry that matches the device name, and its peak."""
    for name, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda item: -len(item[0])):
        if name in device_name:
            return name, flops
    return None, None


def flops_per_token(layers: int, hidden: int, seq: int, vocab: int, head_fraction: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 2 FLOPs per weight in each matrix product,
    the attention score and value products, and the MLM head at `head_fraction` of the positions (the masked
    15% for a sparse head, all of them for the stock dense head)."""
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * 4 * hidden) + 2 * 2 * seq * hidden
    head = 2 * (hidden * hidden + hidden * vocab) * head_fraction
    return 3 * (layers * per_layer + head)


def log_windows(log: str) -> list[dict]:
    """The loop's log windows: step, loss, tokens/s and the share of the window spent waiting for data."""
    pattern = r"step (\d+): loss ([\d.naif]+), lr [\d.e+-]+, (\d+) tokens/s, waited ([\d.]+)% for data"
    return [{"step": int(s), "loss": float(loss), "tokens_per_s": float(rate), "data_wait_pct": float(wait)}
            for s, loss, rate, wait in re.findall(pattern, log)]


# -- the stages (each runs in a process of its own: `--run_stage NAME`) --------------------------------------


class Stage:
    """What a stage process knows: the settings, a work folder shared by the stages, and a record that is
    written to disk at every entry, so a stage stopped at its time limit still hands over what it had."""

    def __init__(self, name: str, workdir: Path, dry: bool):
        import torch

        self.name, self.workdir, self.dry = name, workdir, dry
        self.on_gpu = torch.cuda.is_available()
        self.device_name = torch.cuda.get_device_name() if self.on_gpu else "cpu"
        self.precision = "bf16" if self.on_gpu else "no"
        self.size = {"layers": 2, "hidden": 64, "heads": 2} if dry else {"layers": 12, "hidden": 768, "heads": 12}
        self.batch = 8 if dry else 128
        self.file = workdir / f"{name}.json"
        self.figures: dict = {}

    def record(self, key: str, value) -> None:
        self.figures[key] = value
        self.file.write_text(json.dumps(self.figures, indent=2, default=float))

    def earlier(self, stage: str) -> dict:
        path = self.workdir / f"{stage}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def command(self, script: str, *args: str) -> str:
        """Run one of the package's scripts as a user would; its output is echoed into this stage's log."""
        done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True,
                              text=True, cwd=REPO)
        output = done.stdout + done.stderr
        print(output[-20000:], flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"{script} exited {done.returncode}: {output.strip()[-1500:]}")
        return output


def smoke(stage: Stage) -> None:
    import importlib.metadata
    import pkgutil

    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "numpy",
                 "pyarrow", "datasets", "evaluate", "torchdata", "dill", "multiprocess", "fsspec"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    stage.record("python", sys.version.split()[0])
    stage.record("versions", versions)
    stage.record("unmet_requirements", unmet_requirements())
    stage.record("device", stage.device_name)
    stage.record("bf16_supported", torch.cuda.is_bf16_supported() if stage.on_gpu else None)
    stage.record("cpu_cores", len(os.sched_getaffinity(0)))
    stage.record("dev_shm_gb", shutil.disk_usage("/dev/shm").total / 1e9 if Path("/dev/shm").exists() else None)
    stage.record("gemm_ceiling_flops", gemm_ceiling(stage))
    failed = []
    import tlnlp

    for module in pkgutil.walk_packages(tlnlp.__path__, "tlnlp."):
        try:
            importlib.import_module(module.name)
        except Exception as error:  # every failing module, not only the first
            failed.append(f"{module.name}: {type(error).__name__}: {error}")
    stage.record("modules_failing_to_import", failed)
    if failed:
        raise RuntimeError(f"{len(failed)} tlnlp module(s) do not import: {failed}")
    stage.record("eager_steps_with_loader_workers", eager_steps(stage, steps=20))
    stage.record("compiled_tiny_forward_backward_s", compiled_tiny_step(stage))


def unmet_requirements() -> list[str]:
    """Installed distributions whose requirements the installed versions do not meet (the bundle installs
    with --no-deps, so pip never checked them); information, not an error."""
    import importlib.metadata

    from packaging.requirements import Requirement

    unmet = []
    for name in ("tlnlp", "datasets", "evaluate", "torchdata", "multiprocess", "transformers", "accelerate"):
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{name} needs {requirement}: not installed")
                continue
            if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
                unmet.append(f"{name} needs {requirement}: {found} installed")
    return unmet


def gemm_ceiling(stage: Stage) -> float:
    """FLOP/s of a large bf16 matrix product on this device (fp32 and small on a CPU): the ceiling a model
    can reach, measured here rather than read from a data sheet."""
    import torch

    n, dtype, device = (512, torch.float32, "cpu") if not stage.on_gpu or stage.dry else (8192, torch.bfloat16, "cuda")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def eager_steps(stage: Stage, steps: int) -> dict:
    """`steps` optimizer steps of the MLM model fed by a DataLoader with worker processes (which need
    /dev/shm): the plain path works before any timing is trusted."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from tlnlp.models.modeling import MaskedLMLoss

    device = "cuda" if stage.on_gpu else "cpu"
    size = stage.size
    config = BertConfig(vocab_size=VOCAB, num_hidden_layers=size["layers"], hidden_size=size["hidden"],
                        num_attention_heads=size["heads"], intermediate_size=4 * size["hidden"])
    model = MaskedLMLoss(BertForMaskedLM(config).to(device).train(), sparse=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=stage.on_gpu)
    ids = torch.randint(1000, VOCAB, (steps * stage.batch, 128), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ids, batch_size=stage.batch, num_workers=2, pin_memory=stage.on_gpu)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=stage.on_gpu)
    losses, start = [], time.perf_counter()
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        labels = torch.where(torch.rand(batch.shape, device=device) < 0.15, batch, -100)
        with autocast:
            loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss in the eager steps: {losses}")
    return {"steps": len(losses), "seconds": time.perf_counter() - start, "first_loss": losses[0],
            "last_loss": losses[-1]}


def compiled_tiny_step(stage: Stage) -> float:
    """One torch.compile'd forward and backward of a 2-layer model: the compiler and its kernels work."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    device = "cuda" if stage.on_gpu else "cpu"
    model = BertForMaskedLM(BertConfig(vocab_size=1000, num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                       intermediate_size=128)).to(device)
    compiled = torch.compile(model, dynamic=True)
    ids = torch.randint(5, 1000, (4, 32), device=device)
    start = time.perf_counter()
    compiled(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - start


def step_vs_stock(stage: Stage) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_mlm

    size = stage.size
    result = bench_mlm.main([
        "--layers", str(size["layers"]), "--hidden", str(size["hidden"]), "--heads", str(size["heads"]),
        "--seq", "128", "--batch", str(stage.batch), "--steps", "3" if stage.dry else "30",
        "--warmup", "1" if stage.dry else "5", "--repeats", "1" if stage.dry else "2",
        "--precision", "bf16" if stage.on_gpu else "fp32"])
    for key in ("tokens_per_s_median", "speedup", "mean_loss", "loss_relative_difference", "losses_agree", "config"):
        stage.record(key, result[key])
    if not result["losses_agree"]:
        raise RuntimeError(f"the two steps' losses disagree: {result['mean_loss']}")


def stage1_run(stage: Stage, sparse: bool, compiled: bool) -> None:
    size, steps = stage.size, 6 if stage.dry else 300
    out = stage.workdir / stage.name
    log = stage.command(
        "pretrain_mlm.py", "--dataset_name", "wiki-leads", "--tokenizer_name", "minilm-l6", "--architecture", "bert",
        "--num_hidden_layers", str(size["layers"]), "--hidden_size", str(size["hidden"]),
        "--num_attention_heads", str(size["heads"]), "--intermediate_size", str(4 * size["hidden"]),
        "--max_seq_length", "128", "--per_device_train_batch_size", str(stage.batch), "--max_train_steps", str(steps),
        "--logging_steps", "2" if stage.dry else "20", "--eval_steps", str(steps + 1),  # no evaluation until the end
        "--learning_rate", "1e-4", "--num_warmup_steps", str(steps // 10), "--mixed_precision", stage.precision,
        "--sparse_mlm_head", str(sparse).lower(), "--output_dir", str(out), "--overwrite_output_dir",
        *(["--torch_compile"] if compiled else []))
    results = json.loads((out / "all_results.json").read_text())
    windows = log_windows(log)
    steady = [w["tokens_per_s"] for w in windows[1:]] or [w["tokens_per_s"] for w in windows]
    rate = statistics.median(steady) if steady else None
    model_flops = flops_per_token(size["layers"], size["hidden"], 128, VOCAB, 0.15)
    hardware_flops = flops_per_token(size["layers"], size["hidden"], 128, VOCAB, 0.15 if sparse else 1.0)
    matched, datasheet = peak_flops(stage.device_name)
    ceiling = stage.earlier("smoke").get("gemm_ceiling_flops")
    for key, value in {
        "tokens_per_s_median_window": rate, "tokens_per_s_whole_run": results["train_tokens_per_s"],
        "model_flops_per_token": model_flops, "hardware_flops_per_token": hardware_flops,
        "peak_datasheet_entry": matched, "peak_datasheet_flops": datasheet, "peak_measured_gemm_flops": ceiling,
        "mfu_datasheet": rate * model_flops / datasheet if rate and datasheet else None,
        "hfu_datasheet": rate * hardware_flops / datasheet if rate and datasheet else None,
        "mfu_measured_ceiling": rate * model_flops / ceiling if rate and ceiling else None,
        "hfu_measured_ceiling": rate * hardware_flops / ceiling if rate and ceiling else None,
        "time_to_first_step_s": results.get("time_to_first_step_s"),
        "data_wait_share": results.get("data_wait_s", 0) / results["train_runtime_s"],
        "peak_memory_allocated_gb": results.get("peak_memory_allocated_gb"),
        "peak_memory_reserved_gb": results.get("peak_memory_reserved_gb"),
        "loss_curve": [[w["step"], w["loss"]] for w in windows],
        "loss_at_start_expected": math.log(VOCAB), "eval_loss": results["eval_loss"], "steps": results["optimizer_steps"],
        **{k: v for k, v in results.items() if k.startswith("compile_")},
    }.items():
        stage.record(key, value)


def thesis(stage: Stage) -> None:
    """Stage 1 long enough to matter, then the fine-tuned encoder against its from-scratch twin."""
    layers, hidden = (2, 64) if stage.dry else (4, 512)
    if stage.dry:
        steps = 20
    else:  # about a minute of training: the eager BERT-base run's rate scaled by the FLOPs per token, at half
        # the efficiency (a small model uses a GPU less well), capped so that both fine-tunings still fit
        base = stage.earlier("stage1_tlnlp").get("tokens_per_s_median_window")
        rate = base * flops_per_token(12, 768, 128, VOCAB, 0.15) / flops_per_token(layers, hidden, 128, VOCAB, 0.15) \
            if base else 1_000_000
        steps = int(min(max(0.5 * 60 * rate / (stage.batch * 128), 500), 6_000))
    stage.record("stage1_steps_planned", steps)
    encoder = stage.workdir / "thesis-stage1"
    stage.command(
        "pretrain_mlm.py", "--dataset_name", "wiki-leads", "--tokenizer_name", "minilm-l6", "--architecture",
        "modernbert", "--num_hidden_layers", str(layers), "--hidden_size", str(hidden), "--num_attention_heads",
        str(max(2, hidden // 64)), "--intermediate_size", str(4 * hidden), "--max_seq_length", "128",
        "--per_device_train_batch_size", str(stage.batch), "--max_train_steps", str(steps), "--learning_rate", "5e-4",
        "--num_warmup_steps", str(steps // 10), "--eval_steps", str(steps + 1), "--logging_steps", str(max(steps // 10, 1)),
        "--mixed_precision", stage.precision, "--output_dir", str(encoder), "--overwrite_output_dir")
    results = json.loads((encoder / "all_results.json").read_text())
    stage.record("stage1", {k: results.get(k) for k in ("train_tokens", "train_runtime_s", "train_tokens_per_s",
                                                        "eval_loss", "perplexity", "optimizer_steps")})
    # --dry: one short epoch, without the 100-step floor for small sets (which would make it 25 epochs, each
    # evaluated); wiki-topics' 500 validation and 2,000 test paragraphs are evaluated either way.
    size = ["--max_train_samples", "60", "--max_seq_length", "32", "--num_train_epochs", "1",
            "--min_train_steps", "0"] if stage.dry else \
        ["--max_train_samples", "1000", "--max_seq_length", "128"]
    for arm, extra in (("pretrained", []), ("scratch", ["--from_scratch"])):
        out = stage.workdir / f"thesis-{arm}"
        stage.command(
            "finetune_cls.py", "--model_name_or_path", str(encoder), "--dataset_name", "wiki-topics", *size,
            "--learning_rate", "3e-4", "--mixed_precision", stage.precision, "--seed", "42", "--output_dir", str(out),
            "--overwrite_output_dir", *extra)
        results = json.loads((out / "all_results.json").read_text())
        stage.record(arm, {k: results.get(k) for k in ("test_accuracy", "test_macro_f1", "train_examples_per_s",
                                                       "train_runtime_s", "optimizer_steps")})
    stage.record("transfer_minus_scratch", stage.figures["pretrained"]["test_accuracy"]
                 - stage.figures["scratch"]["test_accuracy"])


STAGES = {
    "smoke": smoke,
    "step_vs_stock": step_vs_stock,
    "stage1_tlnlp": lambda stage: stage1_run(stage, sparse=True, compiled=False),
    "stage1_stock": lambda stage: stage1_run(stage, sparse=False, compiled=False),
    "stage1_compiled": lambda stage: stage1_run(stage, sparse=True, compiled=True),
    "thesis": thesis,
}
assert list(STAGES) == list(LIMITS)


def run_stage(name: str, workdir: Path, dry: bool, fail: bool) -> int:
    stage = Stage(name, workdir, dry)
    stage.record("started", time.strftime("%H:%M:%S"))
    if fail:
        raise RuntimeError(f"stage {name} failed on purpose (--fail_stage)")
    STAGES[name](stage)
    return 0


# -- the orchestrator --------------------------------------------------------------------------------------


def plan(limits: dict[str, float]) -> str:
    lines = [f"{name:16} {seconds:5.0f} s" for name, seconds in limits.items()]
    total = sum(limits.values())
    return "\n".join([*lines, f"{'total':16} {total:5.0f} s ({total / 60:.1f} minutes; the global deadline)"])


def run_in_own_group(command: list[str], limit: float, log_file: Path) -> tuple[str, int | None]:
    """Run `command` with its output in `log_file`; at the limit, end it and every process it started."""
    with log_file.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            return "ok" if process.wait(timeout=limit) == 0 else "failed", process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "timeout", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="Tiny model, a few steps, on any device: checks the "
                        f"script, not the GPU (time limits x{DRY_SLOWDOWN}).")
    parser.add_argument("--output", help="Folder for gpu_check.json and the stages' logs (default: "
                        "benchmarks/results; the JSON is gpu_check_dry.json there with --dry).")
    parser.add_argument("--plan", action="store_true", help="Print each stage's time limit and the total; run nothing.")
    parser.add_argument("--stages", default=",".join(LIMITS), help="Comma-separated stages to run (default: all).")
    parser.add_argument("--limits", default="", help="Override time limits, e.g. 'thesis=200,smoke=90' (seconds).")
    parser.add_argument("--fail_stage", help="Make this stage fail at its start: tests the check's own recovery.")
    parser.add_argument("--run_stage", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_stage:
        return run_stage(args.run_stage, Path(args.workdir), args.dry, args.fail_stage == args.run_stage)

    limits = {name: seconds * (DRY_SLOWDOWN if args.dry else 1) for name, seconds in LIMITS.items()}
    for item in filter(None, args.limits.split(",")):
        name, seconds = item.split("=")
        if name not in limits:
            parser.error(f"--limits names {name!r}; the stages are {', '.join(limits)}")
        limits[name] = float(seconds)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages + ([args.fail_stage] if args.fail_stage else []) if s not in limits]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(limits)}")
    limits = {name: limits[name] for name in limits if name in stages}
    if args.plan:
        print(plan(limits))
        return 0

    out = Path(args.output or REPO / "benchmarks" / "results")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    output = out / f"gpu_check{'_dry' if args.dry else ''}.json"
    deadline = time.monotonic() + sum(limits.values())
    report = {"command": "bash benchmarks/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "dry": args.dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "limits_s": limits, "stages": {}}
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        for name, limit in limits.items():
            left = deadline - time.monotonic()
            if left < 5:
                report["stages"][name] = {"status": "skipped", "error": "the global deadline had passed"}
                output.write_text(json.dumps(report, indent=2, default=float))
                continue
            command = [sys.executable, str(Path(__file__).resolve()), "--run_stage", name, "--workdir", str(workdir)]
            command += (["--dry"] if args.dry else []) + (["--fail_stage", args.fail_stage] if args.fail_stage else [])
            log_file = out / "logs" / f"{name}.log"
            start = time.monotonic()
            status, code = run_in_own_group(command, min(limit, left), log_file)
            log = log_file.read_text(errors="replace")
            figures_file = workdir / f"{name}.json"
            entry = {"status": status, "seconds": round(time.monotonic() - start, 1), "limit_s": min(limit, left),
                     **(json.loads(figures_file.read_text()) if figures_file.exists() else {})}
            if status != "ok":
                errors = re.findall(r"^\w*(?:Error|Exception): .*$", log, flags=re.MULTILINE)
                entry["error"] = (f"exit {code}: {errors[-1][:1500] if errors else 'see log_tail'}" if status == "failed"
                                  else f"stopped at its time limit of {min(limit, left):.0f} s")
                entry["log_tail"] = log[-3000:]
            report["stages"][name] = entry
            output.write_text(json.dumps(report, indent=2, default=float))
            print(f"{name:16} {status:8} {entry['seconds']:6.1f} s  (limit {min(limit, left):.0f} s)", flush=True)
            if name == "smoke" and status != "ok":
                print("the smoke stage failed: the machine cannot run tlnlp, so nothing else runs. "
                      f"See {output} and {log_file}.", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["summary"] = summary(report["stages"])
    output.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report["summary"], indent=2, default=float))
    print(f"wrote {output}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


def summary(stages: dict) -> dict:
    """The headline figures, from whichever stages ran."""
    def get(stage: str, key: str):
        return stages.get(stage, {}).get(key)

    tlnlp_rate, stock_rate = get("stage1_tlnlp", "tokens_per_s_median_window"), get("stage1_stock", "tokens_per_s_median_window")
    compiled_rate = get("stage1_compiled", "tokens_per_s_median_window")
    eager_loss, compiled_loss = get("stage1_tlnlp", "eval_loss"), get("stage1_compiled", "eval_loss")
    return {
        "device": get("smoke", "device"),
        "mfu_datasheet": {s: get(f"stage1_{s}", "mfu_datasheet") for s in ("tlnlp", "stock", "compiled")},
        "mfu_measured_ceiling": {s: get(f"stage1_{s}", "mfu_measured_ceiling") for s in ("tlnlp", "stock", "compiled")},
        "tlnlp_over_stock_same_loop": tlnlp_rate / stock_rate if tlnlp_rate and stock_rate else None,
        "tlnlp_over_stock_step_alone": get("step_vs_stock", "speedup"),
        "compiled_over_eager": compiled_rate / tlnlp_rate if compiled_rate and tlnlp_rate else None,
        "eval_loss_compiled_minus_eager": compiled_loss - eager_loss if eager_loss and compiled_loss else None,
        "transfer_accuracy": (get("thesis", "pretrained") or {}).get("test_accuracy"),
        "scratch_accuracy": (get("thesis", "scratch") or {}).get("test_accuracy"),
        "stages_not_ok": [name for name, s in stages.items() if s["status"] != "ok"],
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a stage process: the traceback goes to its log, which the orchestrator keeps
        traceback.print_exc()
        sys.exit(1)
