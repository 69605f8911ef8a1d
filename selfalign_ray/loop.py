"""The self-alignment loop: for k = 1..K, generate preference data with the current model, train.

    iteration k:  model_{k-1} --generate--> DIR/iter_k/shards --SimPO--> DIR/iter_k/model = model_k

Every step is resumable: generation skips committed chunks, training is skipped when
`DIR/iter_k/train.json` records a finished run, so re-running the same command continues a killed run.
DIR may be a URI (s3://..., gs://...): every file goes through selfalign_ray/data/storage.py.
"""

from __future__ import annotations

import logging
import time

# Local vs remote Ray (and the token-authentication hint); the resource pre-flight. Module names, so that tests
# can replace them.
from selfalign_ray.cluster import init_ray
from selfalign_ray.config import positive, to_dict
from selfalign_ray.data import storage
from selfalign_ray.models.resolve import resolve_model_path
from selfalign_ray.preflight import check_run as preflight

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
    )
    return {"model_dir": str(result.model_dir), "summary": result.summary, "history": result.history}


def run(cfg) -> dict:
    # Absolute output dir first (cluster=remote refuses a relative one: the job's working dir is temporary).
    from selfalign_ray.cluster import apply_output_dir

    apply_output_dir(cfg)
    if cfg.mode.name == "synpo":
        if storage.is_uri(cfg.output_dir):
            from selfalign_ray.config import ConfigError

            raise ConfigError(f"output_dir={cfg.output_dir!r}: mode=synpo writes its outputs to a local or shared "
                              "file system path only; object storage URIs are supported for mode=sao")
        # SynPO has its own loop (generator and improver SFT, cumulative dataset, held-out evaluation).
        from selfalign_ray.synpo.loop import run_synpo

        return run_synpo(cfg)
    started = time.time()
    out = storage.absolute(cfg.output_dir)
    iterations = positive(cfg.iterations, "iterations")
    positive(cfg.dataset_size, "dataset_size")
    if cfg.train.enabled:
        # Bad training settings fail now, not after the generation they would follow.
        from selfalign_ray.train.deepspeed_config import deepspeed_config
        from selfalign_ray.train.trainer import as_train_config

        deepspeed_config(to_dict(cfg.deepspeed), as_train_config(cfg.train))
    base_model = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype)
    init_ray(cfg.cluster)
    # What every stage asks for against what the cluster has or can scale to: refused now, not waited on forever.
    preflight(cfg)
    storage.makedirs(out)
    generate = _generator(cfg.mode.name)
    current = base_model
    report = {"output_dir": out, "mode": cfg.mode.name, "base_model": base_model, "iterations": []}
    for k in range(1, iterations + 1):
        iter_dir = storage.join(out, f"iter_{k}")
        log.info("iteration %d/%d: generating with %s", k, iterations, current)
        manifest = generate(cfg, k, current, iter_dir)
        entry = {"iteration": k, "generator_model": current, "manifest": storage.join(iter_dir, "manifest.json"),
                 "pairs_kept": manifest["pairs_kept"], "inputs": manifest["inputs"], "drops": manifest["drops"],
                 "shards": storage.join(iter_dir, "shards"), "generation": manifest.get("generation")}
        if cfg.train.enabled:
            train_record = storage.join(iter_dir, "train.json")
            if storage.exists(train_record):
                trained = storage.read_json(train_record)
                log.info("iteration %d: training already done, model at %s", k, trained["model_dir"])
            else:
                files = [s["file"] for s in manifest["shards"] if s["rows"] > 0]
                if not files:
                    raise RuntimeError(f"iteration {k}: no preference pairs were kept (drops: {manifest['drops']}); "
                                       "nothing to train on — see the manifest and rejects/")
                init_model = current if cfg.mode.init_from == "previous" else base_model
                trained = _train(cfg, k, init_model, files, iter_dir)
                trained["init_model"] = init_model
                trained["train_files"] = files
                storage.write_json(train_record, trained)
                # The iteration's manifest records the model it trained and how training went.
                manifest = {**manifest, "train": {"init_model": init_model, "model_dir": trained["model_dir"],
                                                  "pairs": trained["summary"]["rows"],
                                                  "summary": trained["summary"]}}
                storage.write_json(storage.join(iter_dir, "manifest.json"), manifest)
            current = trained["model_dir"]
            entry["model"] = current
            entry["train"] = trained["summary"]
        # Optional (eval.enabled): the new model against the base model, into the manifest (selfalign_ray/eval/).
        from selfalign_ray.eval.run import add_to_manifest, evaluate_vs_base

        vs_base = evaluate_vs_base(cfg, k, current, base_model, iter_dir)
        if vs_base:
            entry["eval_vs_base"] = vs_base
            add_to_manifest(iter_dir, "eval_vs_base", vs_base)
        report["iterations"].append(entry)
    report["wall_s"] = round(time.time() - started, 1)
    storage.write_json(storage.join(out, "summary.json"), report)
    # DIR/report.md + DIR/report/*.png from the files on disk; a failure only logs a warning.
    from selfalign_ray.report import write_report_safely

    write_report_safely(out)
    return report
