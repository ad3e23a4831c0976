"""Example trainfleet trainer: classifies scikit-learn's bundled 8x8 digits.

It follows the worker/trainer contract of DESIGN.md ("Worker and trainer
contract") and is what ``etc/training_manifest.toml.example`` runs:

    python examples/trainer/run.py --model gbt --mode realistic --seed 0 \\
        --hyper hyper.json --out OUTDIR [--split-recipe R] [--train-hosts a,b] [--job-id ID]

Arguments (the worker fills them from the manifest's placeholders):

- ``--model``: ``gbt`` (HistGradientBoostingClassifier; hyper ``lr`` float,
  ``n_estimators`` int), ``mlp`` (MLPClassifier; ``hidden`` int, ``lr`` float,
  ``epochs`` int) or ``transformer`` (a tiny PyTorch encoder over the 8 image rows
  as 8 tokens; ``epochs`` int, ``batch_size`` int, ``lr`` float; runs on CUDA
  when available and needs torch, which is optional).
- ``--mode``: ``realistic`` trains on a held-out split and scores the unseen
  rows; ``oracle`` trains on every row and scores those same training rows (an
  optimistic upper bound, useful to spot under-fitting).
- ``--hyper``: path of a JSON object; keys the model does not declare, or values
  of the wrong type, are rejected. Missing keys take the defaults of ``MODELS``
  (gbt: lr 0.1, n_estimators 50; mlp: hidden 64, lr 0.01, epochs 20;
  transformer: epochs 10, batch_size 64, lr 0.001).
- ``--split-recipe`` (realistic mode; empty = ``random``): ``random`` holds out a
  random 25 %, ``stratified`` does the same keeping class proportions, ``by-day``
  holds out the last 25 % in the dataset's collection order (a chronological
  split). The split is fixed, independent of ``--seed``, so every job of a
  recipe is scored on the same rows. ``--seed`` drives the model's randomness
  (gbt column subsampling, mlp init and shuffling, transformer init, dropout
  and batch order).
- ``--train-hosts`` (empty = all): data-source names, comma-separated or as a
  JSON list. The digits have no real sources, so the trainer simulates four:
  each name selects the shard ``crc32(name) % 4`` of the training rows (rows
  are sharded by index); the held-out rows stay the same.
- ``--job-id``: recorded in ``metrics.json`` (default: ``TRAINFLEET_JOB_ID``).
- ``--checkpoint-dir`` (default ``TRAINFLEET_CHECKPOINT_DIR``; empty = none): mlp and
  transformer write a checkpoint there after every epoch (``mlp.npz``: plain arrays, the
  weights and the Adam moments, with the epoch in a JSON string; ``transformer.pt``: model
  and optimizer state_dicts, epoch and the batch-order generator), under a temporary name
  renamed into place, so the worker never uploads a half-written one.
- ``--resume-from`` (default ``TRAINFLEET_RESUME_FROM``; empty = start afresh): such a
  checkpoint, handed to a retried attempt; training goes on from the epoch after it
  (the mlp as a warm start with partial_fit, the transformer with its optimizer state).
  A checkpoint may come from another host, so it is loaded as data, never unpickled:
  ``numpy.load(..., allow_pickle=False)`` and ``torch.load(..., weights_only=True)``.

Outputs in ``--out``: ``model.pkl`` (pickled sklearn estimator) or ``model.pt``
(torch state_dict), and ``metrics.json`` with accuracy, train_seconds, n_train,
n_test, model, mode and the arguments. When ``TRAINFLEET_PROGRESS_FILE`` is set,
progress JSON (``{"fraction", "step", "message"}``) is written to it atomically
after each stage/epoch, ending with fraction 1.0; progress also goes to stdout.

Exit codes: 0 trained; 2 bad arguments (the message names the argument) or
torch missing for ``transformer``; anything else is a crash.
Same seed + hyper + split gives the same model and the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODELS: dict[str, dict[str, tuple[type, int | float]]] = {
    "gbt": {"lr": (float, 0.1), "n_estimators": (int, 50)},
    "mlp": {"hidden": (int, 64), "lr": (float, 0.01), "epochs": (int, 20)},
    "transformer": {"epochs": (int, 10), "batch_size": (int, 64), "lr": (float, 0.001)},
}
MODES = ("realistic", "oracle")
SPLIT_RECIPES = ("random", "stratified", "by-day")
SPLIT_SEED = 12345  # fixed: all jobs of one recipe share the same held-out rows
TEST_FRACTION = 0.25
N_SHARDS = 4
GBT_STAGES = 5

Hyper = dict[str, int | float]
Result = tuple[Any, float, dict[str, Any]]  # (fitted model, accuracy, extra metrics)


class UsageError(Exception):
    """A bad command-line argument; the message names it."""


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class Progress:
    """Reports progress to stdout and, atomically, to TRAINFLEET_PROGRESS_FILE."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def report(self, fraction: float, step: int, message: str) -> None:
        print(f"[{fraction:4.0%}] {message}", flush=True)
        if self.path is None:
            return
        record = {"fraction": round(fraction, 4), "step": step, "message": message}
        try:
            write_json_atomic(self.path, record)
        except OSError as exc:  # progress is best effort; training goes on
            print(f"warning: cannot write progress file {self.path}: {exc}", file=sys.stderr)
            self.path = None


@dataclass
class Checkpoints:
    """Where this run writes its checkpoints and the one it resumes from ("" for none)."""

    directory: str = ""
    resume_from: str = ""

    def save(self, name: str, write: Any) -> None:
        """Write a checkpoint with `write(path)` under a temp name, then rename it into place:
        the worker uploads only finished entries."""
        if not self.directory:
            return
        final = Path(self.directory) / name
        tmp = final.with_name(f".{name}.tmp")
        write(tmp)
        os.replace(tmp, final)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- arguments -------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="trainfleet example trainer (digits)")
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--hyper", required=True, help="path of a JSON file with the hyper dict")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split-recipe", default="", help="random (default), stratified, by-day")
    parser.add_argument("--train-hosts", default="", help="comma-separated data sources")
    parser.add_argument("--job-id", default=os.environ.get("TRAINFLEET_JOB_ID", ""))
    parser.add_argument("--checkpoint-dir",
                        default=os.environ.get("TRAINFLEET_CHECKPOINT_DIR", ""))
    parser.add_argument("--resume-from", default=os.environ.get("TRAINFLEET_RESUME_FROM", ""))
    return parser.parse_args(argv)


def load_hyper(model: str, path: str) -> Hyper:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--hyper: cannot read JSON from {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"--hyper: {path} must hold a JSON object, got {type(raw).__name__}")
    spec = MODELS[model]
    hyper = {key: default for key, (_, default) in spec.items()}
    for key, value in raw.items():
        hyper[key] = check_hyper_value(model, key, value)
    return hyper


def check_hyper_value(model: str, key: str, value: Any) -> int | float:
    spec = MODELS[model]
    if key not in spec:
        known = ", ".join(sorted(spec))
        raise UsageError(f"--hyper: unknown key {key!r} for model {model} (known: {known})")
    kind = spec[key][0]
    ok_types = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise UsageError(f"--hyper: {key} must be {kind.__name__}, got {value!r}")
    if value <= 0:
        raise UsageError(f"--hyper: {key} must be positive, got {value!r}")
    return int(value) if kind is int else float(value)


def parse_split_recipe(text: str) -> str:
    recipe = text.strip() or "random"
    if recipe not in SPLIT_RECIPES:
        known = ", ".join(SPLIT_RECIPES)
        raise UsageError(f"--split-recipe: unknown recipe {text!r} (known: {known})")
    return recipe


def parse_train_hosts(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):  # tolerate a JSON list as well as "a,b"
        try:
            hosts = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--train-hosts: bad JSON list {text!r}") from exc
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise UsageError(f"--train-hosts: expected a list of names, got {text!r}")
        return [h.strip() for h in hosts if h.strip()]
    return [h.strip() for h in text.split(",") if h.strip()]


# --- data --------------------------------------------------------------------


def load_data(mode: str, recipe: str, train_hosts: list[str]) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    idx = np.arange(len(y))
    if mode == "oracle":
        train_idx = test_idx = idx
    elif recipe == "by-day":
        cut = int(len(idx) * (1 - TEST_FRACTION))
        train_idx, test_idx = idx[:cut], idx[cut:]
    else:
        stratify = y if recipe == "stratified" else None
        train_idx, test_idx = train_test_split(
            idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=stratify
        )
    train_idx = select_shards(np.sort(train_idx), train_hosts)
    if mode == "oracle":
        test_idx = train_idx
    return Data(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def select_shards(train_idx: np.ndarray, train_hosts: list[str]) -> np.ndarray:
    if not train_hosts:
        return train_idx
    shards = {zlib.crc32(h.encode("utf-8")) % N_SHARDS for h in train_hosts}
    return train_idx[np.isin(train_idx % N_SHARDS, sorted(shards))]


# --- models ----------------------------------------------------------------


def train_gbt(data: Data, hyper: Hyper, seed: int, progress: Progress) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    total = int(hyper["n_estimators"])
    model = HistGradientBoostingClassifier(
        learning_rate=hyper["lr"],
        max_iter=1,
        max_features=0.8,  # per-split column subsampling: the seed matters
        early_stopping=False,
        warm_start=True,
        random_state=seed,
    )
    stages = sorted({max(1, total * k // GBT_STAGES) for k in range(1, GBT_STAGES + 1)})
    for step, n_iter in enumerate(stages, start=1):
        model.set_params(max_iter=n_iter)
        model.fit(data.x_train, data.y_train)
        progress.report(n_iter / total, n_iter, f"stage {step}: boosting round {n_iter}/{total}")
    return model


def train_mlp(
    data: Data, hyper: Hyper, seed: int, progress: Progress, checkpoints: Checkpoints
) -> Any:
    from sklearn.neural_network import MLPClassifier

    epochs = int(hyper["epochs"])
    model = MLPClassifier(
        hidden_layer_sizes=(int(hyper["hidden"]),),
        learning_rate_init=hyper["lr"],
        random_state=seed,
    )
    done = 0
    classes = np.arange(10)
    if checkpoints.resume_from:  # a warm start: the weights and the optimizer's state
        done = load_mlp(model, checkpoints.resume_from, data, classes, epochs)
        progress.report(done / epochs, done, f"resumed after epoch {done}/{epochs}")
    for epoch in range(done + 1, epochs + 1):
        model.partial_fit(data.x_train, data.y_train, classes=classes)
        checkpoints.save("mlp.npz", lambda path, epoch=epoch: save_mlp(model, epoch, path))
        progress.report(epoch / epochs, epoch, f"epoch {epoch}/{epochs} loss {model.loss_:.4f}")
    return model


# The MLP's state beyond its weights, for an exact resume: the Adam step and moments, and
# what partial_fit keeps between calls (its shuffling RNG is reseeded from random_state on
# every call, so there is none to keep).
MLP_STATE_KEYS = ("t_", "n_iter_", "loss_", "best_loss_", "loss_curve_",
                  "_no_improvement_count")


def save_mlp(model: Any, epoch: int, path: Path) -> None:
    """Plain arrays and a JSON string, nothing pickled: loadable as data on any host."""
    opt = model._optimizer
    state = {key: getattr(model, key) for key in MLP_STATE_KEYS}
    arrays = {f"coef_{i}": a for i, a in enumerate(model.coefs_)}
    arrays |= {f"intercept_{i}": a for i, a in enumerate(model.intercepts_)}
    arrays |= {f"adam_m_{i}": a for i, a in enumerate(opt.ms)}
    arrays |= {f"adam_v_{i}": a for i, a in enumerate(opt.vs)}
    meta = {"epoch": epoch, "adam_t": opt.t, "state": state}
    with open(path, "wb") as fh:  # a file object: savez adds no ".npz" to the temp name
        np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)


def load_mlp(model: Any, path: str, data: Data, classes: np.ndarray, epochs: int) -> int:
    """Rebuild the estimator from an mlp.npz: one partial_fit on one batch makes its
    structure (layers, label binarizer, optimizer), then every array is set from the file,
    checked against the shape and dtype it must have. The epoch it was saved after."""
    model.partial_fit(data.x_train[:200], data.y_train[:200], classes=classes)
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            epoch, adam_t = int(meta["epoch"]), int(meta["adam_t"])
            opt = model._optimizer
            model.coefs_ = _same_arrays(saved, "coef", model.coefs_)
            model.intercepts_ = _same_arrays(saved, "intercept", model.intercepts_)
            opt.ms = _same_arrays(saved, "adam_m", opt.ms)
            opt.vs = _same_arrays(saved, "adam_v", opt.vs)
        opt.t = adam_t
        for key in MLP_STATE_KEYS:
            setattr(model, key, meta["state"][key])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume-from: {path} is not an mlp checkpoint: {exc}") from exc
    if not 0 <= epoch <= epochs:
        raise UsageError(f"--resume-from: {path} was saved after epoch {epoch} of {epochs}")
    return epoch


def _same_arrays(saved: Any, prefix: str, like: list[np.ndarray]) -> list[np.ndarray]:
    arrays = [saved[f"{prefix}_{i}"] for i in range(len(like))]
    for i, (got, want) in enumerate(zip(arrays, like, strict=True)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"{prefix}_{i}: {got.dtype}{got.shape}, expected "
                             f"{want.dtype}{want.shape}")
    return arrays


def save_sklearn(model: Any, out: Path) -> None:
    with open(out / "model.pkl", "wb") as fh:
        pickle.dump(model, fh, protocol=pickle.HIGHEST_PROTOCOL)


def run_sklearn(
    name: str, data: Data, hyper: Hyper, seed: int, progress: Progress, checkpoints: Checkpoints
) -> Result:
    if name == "gbt":  # a few seconds of boosting: no checkpoints
        model = train_gbt(data, hyper, seed, progress)
    else:
        model = train_mlp(data, hyper, seed, progress, checkpoints)
    accuracy = float(model.score(data.x_test, data.y_test))
    return model, accuracy, {}


# --- transformer (optional torch) --------------------------------------------


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise UsageError("transformer needs torch: pip install torch") from exc
    return torch


def build_transformer(torch: Any, n_classes: int = 10, dim: int = 32) -> Any:
    nn = torch.nn

    class RowTransformer(nn.Module):  # type: ignore[misc,name-defined]
        """Each 8-pixel image row is a token; 8 tokens -> encoder -> mean pool."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, dim)
            self.pos = nn.Parameter(torch.zeros(1, 8, dim))
            layer = nn.TransformerEncoderLayer(
                d_model=dim, nhead=4, dim_feedforward=2 * dim, dropout=0.1, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(dim, n_classes)

        def forward(self, x: Any) -> Any:
            tokens = self.embed(x.reshape(-1, 8, 8)) + self.pos
            return self.head(self.encoder(tokens).mean(dim=1))

    return RowTransformer()


def seed_torch(torch: Any, seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def torch_epoch(torch: Any, net: Any, opt: Any, x: Any, y: Any, batch: int, gen: Any) -> float:
    net.train()
    order = torch.randperm(len(y), generator=gen).to(x.device)
    total = 0.0
    for start in range(0, len(y), batch):
        sel = order[start : start + batch]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[sel]), y[sel])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(sel)
    return total / len(y)


def torch_accuracy(torch: Any, net: Any, x: Any, y: Any) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def run_transformer(
    data: Data, hyper: Hyper, seed: int, progress: Progress, checkpoints: Checkpoints
) -> Result:
    torch = import_torch()
    seed_torch(torch, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    progress.report(0.0, 0, f"transformer on {device}")
    net = build_transformer(torch).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=hyper["lr"])
    gen = torch.Generator().manual_seed(seed)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return torch.from_numpy(x).to(device), torch.from_numpy(y.astype(np.int64)).to(device)

    x_train, y_train = tensors(data.x_train, data.y_train)
    x_test, y_test = tensors(data.x_test, data.y_test)
    epochs = int(hyper["epochs"])
    done = 0
    if checkpoints.resume_from:
        done = load_transformer(torch, net, opt, gen, device, checkpoints.resume_from, epochs)
        progress.report(done / epochs, done, f"resumed after epoch {done}/{epochs}")
    for epoch in range(done + 1, epochs + 1):
        loss = torch_epoch(torch, net, opt, x_train, y_train, int(hyper["batch_size"]), gen)
        # "rng": dropout draws from the device's default generator, so a resumed run that
        # did not restore it would train on other dropout masks than an uninterrupted one.
        state = {"net": net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "rng": device_rng(torch, device), "epoch": epoch}
        checkpoints.save("transformer.pt", lambda path, state=state: torch.save(state, path))
        progress.report(epoch / epochs, epoch, f"epoch {epoch}/{epochs} loss {loss:.4f}")
    accuracy = torch_accuracy(torch, net, x_test, y_test)
    extra = {"device": str(device), "torch": torch.__version__}
    return net, accuracy, extra


def device_rng(torch: Any, device: Any) -> Any:
    """The state of the default generator that dropout on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def load_transformer(
    torch: Any, net: Any, opt: Any, gen: Any, device: Any, path: str, epochs: int
) -> int:
    """Restore the model, the optimizer and both generators from a transformer.pt; the epoch
    it was saved after. Loaded on the CPU first (the batch-order generator's state must stay
    there; load_state_dict moves the rest to the device), and with weights_only: tensors and
    plain containers only, since a checkpoint from another host must never run code here."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        if "rng" in saved:  # absent from checkpoints of older versions of this trainer
            if device.type == "cuda":
                torch.cuda.set_rng_state(saved["rng"], device)
            else:
                torch.set_rng_state(saved["rng"])
        epoch = int(saved["epoch"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError,
            pickle.UnpicklingError) as exc:
        raise UsageError(f"--resume-from: {path} is not a transformer checkpoint: {exc}") from exc
    if not 0 <= epoch <= epochs:
        raise UsageError(f"--resume-from: {path} was saved after epoch {epoch} of {epochs}")
    return epoch


def save_torch(net: Any, out: Path) -> None:
    import torch

    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save(state, out / "model.pt")


# --- main ------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict[str, Any]:
    hyper = load_hyper(args.model, args.hyper)
    recipe = parse_split_recipe(args.split_recipe)
    hosts = parse_train_hosts(args.train_hosts)
    if args.model == "transformer":
        import_torch()  # fail fast, before any work, when torch is missing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(os.environ.get("TRAINFLEET_PROGRESS_FILE"))
    progress.report(0.0, 0, f"loading digits ({args.mode}, split {recipe})")
    data = load_data(args.mode, recipe, hosts)
    if len(data.y_train) == 0:
        raise UsageError(f"--train-hosts: {args.train_hosts!r} selects no training rows")
    started = time.perf_counter()
    checkpoints = Checkpoints(args.checkpoint_dir, args.resume_from)
    if args.model == "transformer":
        model, accuracy, extra = run_transformer(data, hyper, args.seed, progress, checkpoints)
        save_torch(model, out)
    else:
        model, accuracy, extra = run_sklearn(args.model, data, hyper, args.seed, progress,
                                             checkpoints)
        save_sklearn(model, out)
    metrics = {
        "accuracy": accuracy,
        "train_seconds": round(time.perf_counter() - started, 4),
        "n_train": int(len(data.y_train)),
        "n_test": int(len(data.y_test)),
        "model": args.model,
        "mode": args.mode,
        "seed": args.seed,
        "hyper": hyper,
        "split_recipe": recipe,
        "train_hosts": hosts,
        "job_id": args.job_id,
        "dataset": "sklearn.datasets.load_digits",
        **extra,
    }
    write_json_atomic(out / "metrics.json", metrics)
    steps = int(hyper.get("epochs", hyper.get("n_estimators", 0)))
    progress.report(1.0, steps, f"done: accuracy {accuracy:.4f}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UsageError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
