"""What an eval scores: a target is a model, maybe an adapter on it, and where its results go.

A run's targets are its base model (``base``, step 0) and every complete checkpoint; a single
target comes from ``--model``/``--adapter``. A target's ``identity`` is what its results are keyed
on -- the adapter file's hash and the recorded probe fingerprint -- so results written for other
weights (a run retrained with ``--force`` since) are never taken for this target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_ft import runs
from mlx_ft.errors import UserError
from mlx_ft.files import read_json, sha256
from mlx_ft.models import identity, resolve_model


@dataclass(frozen=True)
class Target:
    name: str  # "base", "step_000100", a fused model's folder name
    model: Path
    adapter: Path | None
    out_dir: Path  # results go to out_dir/<suite>.json
    step: int | None = None
    fingerprint: dict | None = None  # the recorded probe answer the engine must reproduce
    val_loss: float | None = None

    def result_path(self, suite_name: str) -> Path:
        return runs.result_path(self.out_dir, suite_name)

    def partial_path(self, suite_name: str) -> Path:
        return runs.partial_path(self.out_dir, suite_name)

    def identity(self) -> dict:
        """What these weights are: the adapter file's sha256 (if any) and the probe fingerprint."""
        return {"adapter_sha256": sha256(self.adapter / runs.ADAPTERS) if self.adapter else None,
                "fingerprint_token_ids": (self.fingerprint or {}).get("token_ids"),
                "fingerprint_logprobs": (self.fingerprint or {}).get("logprobs")}


def run_targets(run_dir: str | Path) -> list[Target]:
    """The base model as step 0, then every complete checkpoint (manifest present)."""
    run = runs.read_run(run_dir)
    model = Path(run["model_path"])
    base = run.get("base", {})
    targets = [Target(runs.BASE, model, None, runs.evals_dir(run_dir, runs.BASE), 0, base.get("fingerprint"),
                      base.get("val_loss"))]
    for c in runs.complete_checkpoints(run_dir):
        targets.append(Target(c.name, Path(c.manifest.get("base_model", model)), c.path,
                              runs.evals_dir(run_dir, c.name), c.step, c.manifest.get("fingerprint"),
                              c.manifest.get("val_loss")))
    return targets


def single_target(model: str | Path | None, adapter: str | Path | None, out: str | Path | None) -> Target:
    """A target from --model/--adapter, with its fingerprint if one was recorded next to it."""
    if adapter is not None:
        return _adapter_target(Path(adapter), model, out)
    path = resolve_model(str(model) if model else None)
    fp = None
    for record in ("fused.json", "mlxft_import.json"):
        if (path / record).is_file():
            fp = read_json(path / record).get("fingerprint")
    repo_id = identity(str(model) if model else None, path)["repo_id"]
    if repo_id:  # a Hugging Face cache snapshot: named after the repo; never write into the cache
        name = repo_id.split("/")[-1]
        return Target(name, path, None, Path(out) if out else Path("runs") / "models" / name / "evals", None, fp)
    return Target(path.name, path, None, Path(out) if out else path / "evals", None, fp, None)


def _adapter_target(adapter: Path, model: str | Path | None, out: str | Path | None) -> Target:
    if not (adapter / runs.ADAPTERS).is_file():
        raise UserError(f"{adapter}: no {runs.ADAPTERS}; give a checkpoint folder")
    if model is None and (adapter / "adapter_config.json").is_file():
        model = read_json(adapter / "adapter_config.json").get("model")  # the base it was trained on
    path = resolve_model(str(model) if model else None)
    manifest = read_json(adapter / runs.MANIFEST) if (adapter / runs.MANIFEST).is_file() else {}
    run_dir = runs.run_of_checkpoint(adapter)
    default_out = runs.evals_dir(run_dir, adapter.name) if run_dir else adapter / "evals"
    return Target(adapter.name, path, adapter, Path(out) if out else default_out, manifest.get("step"),
                  manifest.get("fingerprint"), manifest.get("val_loss"))
