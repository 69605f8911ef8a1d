"""The self-alignment loop: for k = 1..K, generate preference data with the current model, train.

    iteration k:  model_{k-1} --generate--> DIR/iter_k/shards --SimPO--> DIR/iter_k/model = model_k

Every step is resumable: generation skips committed chunks, training is skipped when
`DIR/iter_k/train.json` records a finished run with the same settings (selfalign_ray/steps.py; different settings
are refused), so re-running the same command continues a killed run.
DIR may be a URI (s3://..., gs://...): every file goes through selfalign_ray/data/storage.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

# Local vs remote Ray (and the token-authentication hint); the resource pre-flight. Module names, so that tests
# can replace them.
from selfalign_ray.cluster import init_ray
from selfalign_ray.config import positive, to_dict
from selfalign_ray.data import storage
from selfalign_ray.data.runlock import RunLock, note_ray_job
from selfalign_ray.models.loading import ModelLoadConfig
from selfalign_ray.models.resolve import resolve_model_path
from selfalign_ray.preflight import check_run as preflight
from selfalign_ray.steps import files_identity, model_identity, run_step, train_settings

log = logging.getLogger(__name__)

def _generator(mode_name: str):
    if mode_name == "sao":
        from selfalign_ray.sao.pipeline import generate_sao

        return generate_sao
    raise ValueError(f"mode.name={mode_name!r} is not implemented (known: sao)")


def _train(cfg, iteration: int, init_model: str, train_files: list[str], iter_dir: str) -> dict:
    from selfalign_ray.train import train_model

    result = train_model(
        model_path=init_model,
        train_files=train_files,
        output_dir=storage.join(iter_dir, "model"),
        cfg=cfg.train,
        deepspeed_cfg=to_dict(cfg.deepspeed),
        objective="simpo",
        run_name=f"{cfg.mode.name}-iter{iteration}",
        keep_checkpoints=True,
        model_load=ModelLoadConfig.from_model_node(cfg.model).to_json(),
    )
    # The checkpoints stay until train.json records the result (_recorded): a crash between costs no retrain.
    result = {"model_dir": str(result.model_dir), "summary": result.summary, "history": result.history,
              "init_model": init_model, "train_files": train_files}
    return result


def _recorded(trained: dict, iter_dir: Path | str) -> None:
    """Once iter_dir/train.json holds the result: its checkpoints go, the manifest records the trained model."""
    from selfalign_ray.train import remove_checkpoints

    remove_checkpoints(trained["model_dir"])
    path = storage.join(iter_dir, "manifest.json")
    manifest = storage.read_json(path)
    record = {"init_model": trained["init_model"], "model_dir": trained["model_dir"],
              "pairs": trained["summary"]["rows"], "summary": trained["summary"],
              "fingerprint": trained["fingerprint"]}
    if manifest.get("train") != record:
        manifest["train"] = record
        storage.write_json(path, manifest)


def run(cfg) -> dict:
    """One run (SAO or SynPO) inside its tracker run (tracker=none|mlflow|wandb, selfalign_ray/tracking/). The
    tracker starts before anything is written: one that cannot start is a user error (TrackerError)."""
    from selfalign_ray.tracking import tracking_run

    with tracking_run(cfg) as tracking:
        report = _run(cfg)
        tracking.finish(report["output_dir"])  # report.md, report/, summary.json as artifacts
    return report


def _run(cfg) -> dict:
    # Absolute output dir first (cluster=remote refuses a relative one: the job's working dir is temporary).
    from selfalign_ray.cluster import apply_output_dir

    out = apply_output_dir(cfg)
    # One driver per output dir, for the whole run (SAO and SynPO; a sweep's jobs each lock their own dir).
    with RunLock(out):
        if cfg.mode.name == "synpo":
            # SynPO has its own loop (generator and improver SFT, cumulative dataset, held-out evaluation).
            if storage.is_uri(out):
                from selfalign_ray.config import ConfigError

                raise ConfigError(f"output_dir={cfg.output_dir!r}: mode=synpo writes its outputs to a local or "
                                  "shared file system path only; object storage URIs are supported for mode=sao")
            from selfalign_ray.synpo.loop import run_synpo

            return run_synpo(cfg)
        return _run_sao(cfg)


def _run_sao(cfg) -> dict:
    started = time.time()
    out = storage.absolute(cfg.output_dir)
    iterations = positive(cfg.iterations, "iterations")
    positive(cfg.dataset_size, "dataset_size")
    from selfalign_ray.train.trainer import as_train_config

    if cfg.train.enabled:
        # Bad training settings fail now, not after the generation they would follow.
        from selfalign_ray.train.deepspeed_config import deepspeed_config

        deepspeed_config(to_dict(cfg.deepspeed), as_train_config(cfg.train))
    base_model = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype,
                                    allow_pickle_weights=bool(cfg.model.get("allow_pickle_weights", False)))
    init_ray(cfg.cluster)
    note_ray_job()  # the output dir's lock records the Ray job id (data/runlock.py)
    # What every stage asks for against what the cluster has or can scale to: refused now, not waited on forever.
    preflight(cfg)
    storage.makedirs(out)
    generate = _generator(cfg.mode.name)
    current = base_model
    # What each model is (path + content or the fingerprint of the step that trained it; selfalign_ray/steps.py).
    # A pinned hub revision is part of what the base model is (models/loading.py).
    revision = ModelLoadConfig.from_model_node(cfg.model).revision
    base_identity = current_identity = {**model_identity(base_model), **({"revision": revision} if revision else {})}
    report = {"output_dir": out, "mode": cfg.mode.name, "base_model": base_model, "iterations": []}
    for k in range(1, iterations + 1):
        iter_dir = storage.join(out, f"iter_{k}")
        log.info("iteration %d/%d: generating with %s", k, iterations, current)
        manifest = generate(cfg, k, current, iter_dir)
        entry = {"iteration": k, "generator_model": current, "manifest": storage.join(iter_dir, "manifest.json"),
                 "pairs_kept": manifest["pairs_kept"], "inputs": manifest["inputs"], "drops": manifest["drops"],
                 "shards": storage.join(iter_dir, "shards"), "generation": manifest.get("generation")}
        if cfg.train.enabled:
            files = [s["file"] for s in manifest["shards"] if s["rows"] > 0]
            if not files:
                raise RuntimeError(f"iteration {k}: no preference pairs were kept (drops: {manifest['drops']}); "
                                   "nothing to train on — see the manifest and rejects/")
            init_model, init_identity = ((current, current_identity) if cfg.mode.init_from == "previous"
                                         else (base_model, base_identity))
            # The settings this step's model depends on: a finished step is reused under the same ones only.
            settings = train_settings(as_train_config(cfg.train), to_dict(cfg.deepspeed), init_identity,
                                      files_identity(files, out), "simpo")
            trained = run_step(storage.join(iter_dir, "train.json"), f"iteration {k}: training", settings,
                               lambda: _train(cfg, k, init_model, files, iter_dir),
                               after=lambda t: _recorded(t, iter_dir))
            current, current_identity = trained["model_dir"], model_identity(trained["model_dir"],
                                                                             trained["fingerprint"])
            entry["model"] = current
            entry["train"] = trained["summary"]
            entry["train_fingerprint"] = trained["fingerprint"]
        # Optional (eval.enabled): the new model against the base model, into the manifest (selfalign_ray/eval/).
        from selfalign_ray.eval.run import add_to_manifest, evaluate_vs_base

        vs_base = evaluate_vs_base(cfg, k, current, base_model, iter_dir, current_identity, base_identity)
        if vs_base:
            entry["eval_vs_base"] = vs_base
            add_to_manifest(iter_dir, "eval_vs_base", vs_base)
        # The tracker (tracker=...): this iteration's metrics from its final manifest, and the manifest.
        from selfalign_ray.tracking import active

        active().iteration(k, iter_dir, {f"{cfg.mode.name}-iter{k}": storage.join(iter_dir, "model")})
        report["iterations"].append(entry)
    report["wall_s"] = round(time.time() - started, 1)
    storage.write_json(storage.join(out, "summary.json"), report)
    # DIR/report.md + DIR/report/*.png from the files on disk; a failure only logs a warning.
    from selfalign_ray.report import write_report_safely

    write_report_safely(out)
    return report
