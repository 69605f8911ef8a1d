"""The SynPO loop (paper Algorithm 1), on the project's generation pools and trainer.

    once:        seeds -> train / held-out split; keyword corpus
                 generator G = SFT(θ0, keyword template -> seed prompt + answer)        DIR/synpo/generator/
                 held-out evaluation of θ0                                              DIR/synpo/eval_base.json
    t = 1..K:    improver R_t = SFT(θ0, (seed prompt, π_{t-1} answer) -> gold answer)  DIR/iter_t/improver/
                 keyword lists -> G -> prompts -> π_{t-1} answers -> R_t rewrites (chosen)
                                   -> π_0 answers (rejected) -> filters                 DIR/iter_t/shards/
                 D <- D ∪ (up to pairs_per_iteration new pairs)                         DIR/iter_t/added/
                 π_t = SimPO(θ0 on D)  (mode.init_from=base, the paper)                 DIR/iter_t/model/
                 held-out evaluation of π_t                                             DIR/iter_t/eval.json

Every step is resumable: a step whose record (`*.json` next to its output) holds the same settings is skipped
(other settings are refused, selfalign_ray/steps.py), pair
generation skips committed chunks, and the settings that decide the outputs are bound in
DIR/synpo/run.json, so re-running the same command continues a killed run and a different one is refused.
With train.enabled=false the SimPO step is skipped (π_t stays θ0); the generator and improver are still
trained, since SynPO cannot make data without them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from selfalign_ray.config import positive, to_dict
from selfalign_ray.data.shards import ResumeMismatchError, atomic_write_json
from selfalign_ray.engines.config import engine_config
from selfalign_ray.models.resolve import resolve_model_path
from selfalign_ray.redaction import redact
from selfalign_ray.synpo.config import (
    SynpoConfig,
    sft_train_config,
    simpo_train_config,
    synpo_config,
)
from selfalign_ray.synpo.corpus import build_corpus, sample_keyword_lists
from selfalign_ray.synpo.dataset import add_pairs, cumulative_files, earlier_prompt_ids
from selfalign_ray.synpo.pipeline import Models, generate_pairs
from selfalign_ray.synpo.seed_passes import evaluate_heldout, improver_training_data
from selfalign_ray.synpo.seeds import SeedSplit, load_seeds, split_seeds
from selfalign_ray.synpo.sft_data import generator_examples, write_sft
from selfalign_ray.steps import (
    engine_settings,
    eval_settings,
    files_identity,
    fingerprint,
    model_identity,
    run_step,
    train_settings,
)
from selfalign_ray.train.config import TrainConfig

log = logging.getLogger(__name__)


def _bind(path: Path, settings: dict) -> None:
    """Record the settings of this output dir; refuse to resume it under different ones."""
    # Secret values (a token under mode.*) are never written; compared redacted, so a new token still resumes.
    settings = redact(json.loads(json.dumps(settings, default=str)))
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ResumeMismatchError(f"{path.parent.parent} already holds a SynPO run with different settings "
                                      f"({', '.join(diff)}); resume it with the same settings or choose another output_dir.")
    else:
        atomic_write_json(path, settings)


def _once(record: Path, what: str, settings: dict, work, trains: bool = False):
    """Run `work()` unless `record` holds its result under the same `settings` (a resumed run; other settings are
    refused, selfalign_ray/steps.py); store the result with its settings there. A training step's checkpoints are
    deleted only once the record is written."""
    def drop_checkpoints(result: dict) -> None:
        from selfalign_ray.train import remove_checkpoints

        remove_checkpoints(result["model_dir"])

    return run_step(record, what, settings, work, after=drop_checkpoints if trains else None)


def _sft(model: str, data_file: str, output_dir: Path, cfg: TrainConfig, deepspeed: dict, run_name: str,
         model_load: dict | None = None) -> dict:
    from selfalign_ray.train import train_model

    result = train_model(model_path=model, train_files=[data_file], output_dir=str(output_dir), cfg=cfg,
                         deepspeed_cfg=deepspeed, objective="sft", run_name=run_name, keep_checkpoints=True,
                         model_load=model_load)
    return {"model_dir": result.model_dir, "init_model": model, "train_files": [data_file], "summary": result.summary}



def empty_dataset_message(iteration: int, drops: dict, truncation: str) -> str:
    """Why an iteration has nothing to train on, and what to change when cut texts were the cause."""
    message = (f"iteration {iteration}: the cumulative dataset is empty (drops: {drops}); nothing to train on — "
               "see the manifest and rejects/")
    cut = {reason: n for reason, n in drops.items() if reason.startswith("truncated_")}
    if cut and truncation == "drop":
        message += (f". {sum(cut.values())} of the drops are texts cut at their max_tokens ({cut}): raise the stage's "
                    "max_tokens, or keep cut texts marked and train them without end-of-turn with "
                    "mode.truncation=keep_without_eos (small models on CPU rarely finish an answer in 64 tokens)")
    return message

class SynpoRun:
    """State shared by the steps of one run (config, models, seeds, corpus)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.sc: SynpoConfig = synpo_config(cfg.mode)
        self.out = Path(cfg.output_dir).expanduser().resolve()
        self.work = self.out / "synpo"
        self.seed = cfg.seed
        self.base = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype,
                                       allow_pickle_weights=bool(cfg.model.get("allow_pickle_weights", False)))
        self.judge = resolve_model_path("hf", self.sc.filter.judge_model) if self.sc.filter.judge_model else self.base
        self.engine = engine_config(cfg)
        self.sft_cfg = sft_train_config(cfg.train, self.sc.sft)
        self.improver_sft_cfg = sft_train_config(cfg.train, {**self.sc.sft, **self.sc.improver_sft})
        self.simpo_cfg = simpo_train_config(cfg.train, self.sc.simpo)
        self.deepspeed = to_dict(cfg.deepspeed)
        seeds, self.seed_report = load_seeds(self.sc.seeds)
        self.split: SeedSplit = split_seeds(seeds, self.sc.seeds, self.seed)
        self.corpus = build_corpus(self.sc.keywords, [(s.id, s.prompt) for s in self.split.train + self.split.unused])
        # What each model is (selfalign_ray/steps.py): base models by content, trained ones by their step.
        self.identities = {self.base: model_identity(self.base)}
        self.run_fingerprint = None

    def identity(self, model: str) -> dict:
        if model not in self.identities:
            self.identities[model] = model_identity(model)
        return self.identities[model]

    def trained(self, record: dict) -> dict:
        """Remember the identity of a model a step trained; return the record."""
        self.identities[record["model_dir"]] = model_identity(record["model_dir"], record["fingerprint"])
        return record

    def bind(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        settings = {
            "base_model": self.base, "judge_model": self.judge, "seed": self.seed, "mode": to_dict(self.cfg.mode),
            "sft": {k: v for k, v in asdict(self.sft_cfg).items() if k != "enabled"},
            "improver_sft": {k: v for k, v in asdict(self.improver_sft_cfg).items() if k != "enabled"},
            "simpo": {k: v for k, v in asdict(self.simpo_cfg).items() if k != "enabled"},
            "seed_split": self.split.to_json(), "corpus": self.corpus.stats()["paragraphs"],
            # Another hub revision is another model (only when pinned, so that older run.json files still match).
            **({"model_revision": self.engine.load.revision} if self.engine.load.revision else {}),
        }
        _bind(self.work / "run.json", settings)
        # The SFT data of the generator and improvers follow from these (seeds, split, keywords, mode).
        self.run_fingerprint = fingerprint(settings)

    # ------------------------------------------------------------------------------------------ steps
    def generator(self) -> dict:
        def work():
            rows, skipped = generator_examples(self.split.train, self.seed, self.sc.keywords.top_k,
                                               self.sc.keywords.min_word_length)
            if len(rows) < 2:
                raise ValueError(f"only {len(rows)} training seeds give a keyword list ({dict(skipped)}); "
                                 "the generator needs at least 2 examples")
            data = write_sft(self.work / "generator_sft.parquet", rows)
            trained = _sft(self.base, data, self.work / "generator", self.sft_cfg, self.deepspeed, "synpo-generator",
                           model_load=self.engine.model_load)
            return {**trained, "examples": len(rows), "skipped_seeds": dict(skipped)}

        settings = train_settings(self.sft_cfg, self.deepspeed, self.identity(self.base), self.run_fingerprint, "sft")
        return self.trained(_once(self.work / "generator.json", "generator SFT", settings, work, trains=True))

    def evaluate(self, model: str, record: Path, iteration: int) -> dict | None:
        if not self.sc.eval.enabled or not self.split.heldout:
            return None
        settings = {**eval_settings(asdict(self.sc.eval), self.engine,
                                    {"model": self.identity(model), "judge": self.identity(self.judge)}, self.seed),
                    "iteration": iteration, "heldout": self.run_fingerprint}
        return _once(record, f"held-out evaluation of {model}", settings,
                     lambda: evaluate_heldout(model, self.judge, self.split.heldout, self.sc, self.engine,
                                              self.seed, iteration))

    def improver(self, iteration: int, policy: str, iter_dir: Path) -> dict:
        def work():
            examples, stats = improver_training_data(self.split.train, policy, self.judge, self.sc, self.engine,
                                                     self.seed, iteration)
            if len(examples) < 2:
                raise RuntimeError(f"iteration {iteration}: only {len(examples)} improver examples ({stats}); "
                                   "the improver needs at least 2 (see mode.improve.min_gold_gap)")
            data = write_sft(iter_dir / "improver_sft.parquet", examples)
            trained = _sft(self.base, data, iter_dir / "improver", self.improver_sft_cfg, self.deepspeed,
                           f"synpo-improver-iter{iteration}", model_load=self.engine.model_load)
            return {**trained, "policy": policy, "data": stats}

        settings = {**train_settings(self.improver_sft_cfg, self.deepspeed, self.identity(self.base),
                                     self.run_fingerprint, "sft"),
                    "policy": self.identity(policy), "judge": self.identity(self.judge),
                    "engine": engine_settings(self.engine), "iteration": iteration}
        return _once(iter_dir / "improver.json", f"iteration {iteration}: improver SFT", settings, work, trains=True)

    def simpo(self, iteration: int, init_model: str, files: list[str], iter_dir: Path) -> dict:
        def work():
            from selfalign_ray.train import train_model

            result = train_model(model_path=init_model, train_files=files, output_dir=str(iter_dir / "model"),
                                 cfg=self.simpo_cfg, deepspeed_cfg=self.deepspeed, objective="simpo",
                                 run_name=f"synpo-iter{iteration}", keep_checkpoints=True,
                                 model_load=self.engine.model_load)
            return {"model_dir": result.model_dir, "init_model": init_model, "train_files": files,
                    "summary": result.summary, "history": result.history}

        settings = train_settings(self.simpo_cfg, self.deepspeed, self.identity(init_model),
                                  files_identity(files, self.out), "simpo")
        return self.trained(_once(iter_dir / "train.json", f"iteration {iteration}: SimPO", settings, work,
                                  trains=True))

    def iteration(self, k: int, policy: str, generator: str) -> tuple[dict, str]:
        """Run iteration k with π_{k-1} = `policy`; return its report entry and π_k."""
        sc, iter_dir = self.sc, self.out / f"iter_{k}"
        iter_dir.mkdir(parents=True, exist_ok=True)
        improver = self.improver(k, policy, iter_dir)
        models = Models(base=self.base, generator=generator, policy=policy, improver=improver["model_dir"],
                        judge=self.judge)
        lists = sample_keyword_lists(self.corpus, sc.keyword_lists, self.seed, k, sc.keywords)
        log.info("iteration %d: %d keyword lists -> prompts -> pairs (pools: generator, policy, improver, initial)",
                 k, len(lists))
        manifest = generate_pairs(sc, k, models, iter_dir, lists, earlier_prompt_ids(self.out, k), self.engine,
                                  self.seed, {"corpus": self.corpus.stats(), "seed_input_errors": self.seed_report.to_json(),
                                              "model_load": self.engine.model_load})
        added = add_pairs(iter_dir, manifest, sc.pairs_per_iteration, self.seed, k)
        files, cumulative = cumulative_files(self.out, k)
        manifest.update(improver={k_: improver[k_] for k_ in ("model_dir", "data", "summary", "wall_s")},
                        added=added, cumulative_pairs=cumulative, cumulative_files=files)
        entry = {"iteration": k, "generator_model": policy, "manifest": str(iter_dir / "manifest.json"),
                 "pairs_kept": manifest["pairs_kept"], "inputs": manifest["inputs"], "drops": manifest["drops"],
                 "shards": str(iter_dir / "shards"), "generation": manifest.get("generation"),
                 "pairs_added": added["rows"], "cumulative_pairs": cumulative}
        current = policy
        if self.cfg.train.enabled:
            if not files:
                raise RuntimeError(empty_dataset_message(k, manifest["drops"], sc.truncation))
            init = self.base if sc.init_from == "base" else policy
            trained = self.simpo(k, init, files, iter_dir)
            current = trained["model_dir"]
            manifest["train"] = {"init_model": init, "model_dir": current, "pairs": trained["summary"]["rows"],
                                 "summary": trained["summary"]}
            entry.update(model=current, train=trained["summary"])
            evaluation = self.evaluate(current, iter_dir / "eval.json", k)
            if evaluation:
                manifest["eval"] = evaluation
                entry["eval"] = evaluation
            # Optional (eval.enabled): π_k against θ0 on the evaluation prompts (selfalign_ray/eval/).
            from selfalign_ray.eval.run import evaluate_vs_base

            vs_base = evaluate_vs_base(self.cfg, k, current, self.base, iter_dir, self.identity(current),
                                       self.identity(self.base))
            if vs_base:
                manifest["eval_vs_base"] = entry["eval_vs_base"] = vs_base
        atomic_write_json(iter_dir / "manifest.json", manifest)
        # The tracker (tracker=...): this iteration's metrics from its final manifest, and the manifest.
        from selfalign_ray.tracking import active

        active().iteration(k, iter_dir, {f"synpo-improver-iter{k}": iter_dir / "improver",
                                         f"synpo-iter{k}": iter_dir / "model"})
        return entry, current


def run_synpo(cfg) -> dict:
    from selfalign_ray.cluster import init_ray
    from selfalign_ray.data.runlock import note_ray_job
    from selfalign_ray.preflight import check_run

    started = time.time()
    iterations = positive(cfg.iterations, "iterations")
    run = SynpoRun(cfg)
    init_ray(cfg.cluster)
    note_ray_job()  # the output dir's lock records the Ray job id (data/runlock.py)
    # Every stage's resources against the cluster, before run.json binds the output dir.
    check_run(cfg)
    run.bind()
    atomic_write_json(run.work / "seeds.json", {**run.split.to_json(), "input_errors": run.seed_report.to_json()})
    report = {"output_dir": str(run.out), "mode": "synpo", "base_model": run.base, "iterations": []}
    generator = run.generator()
    from selfalign_ray.tracking import active

    active().training("synpo-generator", run.work / "generator")  # its steps, if an earlier attempt trained it
    report["generator"] = {"model": generator["model_dir"], "examples": generator["examples"],
                           "train": generator["summary"]}
    # θ0 on the held-out slice: the reference every iteration's evaluation is read against.
    baseline = run.evaluate(run.base, run.work / "eval_base.json", 0) if run.sc.eval.baseline else None
    if baseline:
        report["eval_base"] = baseline
        active().evaluation(0, baseline, "eval_heldout")
    current = run.base
    for k in range(1, iterations + 1):
        entry, current = run.iteration(k, current, generator["model_dir"])
        report["iterations"].append(entry)
    report["wall_s"] = round(time.time() - started, 1)
    atomic_write_json(run.out / "summary.json", report)
    _log_evaluations(report)
    # DIR/report.md + DIR/report/*.png from the files on disk; a failure only logs a warning.
    from selfalign_ray.report import write_report_safely

    write_report_safely(run.out)
    return report


def _log_evaluations(report: dict) -> None:
    rows = ([("base", report["eval_base"])] if "eval_base" in report else []) + \
           [(f"iter_{it['iteration']}", it["eval"]) for it in report["iterations"] if it.get("eval")]
    for name, e in rows:
        if e.get("win_rate") is not None:
            log.info("held-out %s: win rate vs gold %.3f, mean preference %.3f (%d prompts judged)",
                     name, e["win_rate"], e["mean_preference"], e["judged"])
