"""Child of tests/test_logprobs.py: under DeepSpeed ZeRO-3 (gloo, world 1, parameters partitioned), the loss
and gradients of the chunked log-prob path equal the full-logits path, for a tied and an untied LM head.
Usage: python zero3_logprobs_child.py MODEL_DIR; prints one line `RESULT {json}` per head."""
import json
import os
import random
import socket
import sys

import torch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  LOCAL_WORLD_SIZE="1")
import deepspeed
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from deepspeed.utils import safe_get_full_grad

from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.data import Example, collate
from selfalign_ray.train.deepspeed_config import deepspeed_config
from selfalign_ray.train.objectives import run_micro_batch
from selfalign_ray.train.worker import make_adamw

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
model_path = sys.argv[1]
rng = random.Random(0)
exs = []
for _ in range(4):
    p, r = rng.randint(3, 9), rng.randint(10, 20)
    ids = [rng.randrange(200) for _ in range(p + r)]
    exs.append(Example(ids, [-100] * p + ids[p:]))
batch = collate(exs, pad_id=0, padding_free=True)
for untie in (False, True):
    out = {}
    for chunk in (0, 7):
        cfg = TrainConfig(per_device_batch_size=2, global_batch_size=2, num_workers=1, logprob_chunk_tokens=chunk)
        ds = deepspeed_config(OmegaConf.load("conf/deepspeed/zero3.yaml"), cfg)
        hf_ds = HfDeepSpeedConfig(ds)
        kw = {"tie_word_embeddings": False} if untie else {}
        torch.manual_seed(0)  # an untied head is missing from the tied checkpoint: initialised alike in both runs
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa", **kw)
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_adamw(model.parameters(), 1e-3, 0.0), config=ds)
        engine.set_gradient_accumulation_boundary(True)
        mb = run_micro_batch(engine, batch, cfg, "simpo")
        engine.backward(mb.loss)
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
        missing = sorted(n for n, g in grads.items() if g is None)
        out[chunk] = {"loss": float(mb.loss), "missing": missing,
                      "grads": {n: g.detach().clone() for n, g in grads.items() if g is not None},
                      "ds_params": sum(hasattr(p, "ds_id") for p in engine.module.parameters())}
        del engine, model, hf_ds
    a, b = out[0], out[7]
    worst = max(((a["grads"][n] - b["grads"][n]).abs().max() / a["grads"][n].abs().max().clamp(min=1e-12)).item()
                for n in a["grads"])
    print("RESULT " + json.dumps({"loss_full": a["loss"], "loss_chunked": b["loss"], "missing": [a["missing"], b["missing"]],
                                   "n_grads": [len(a["grads"]), len(b["grads"])], "worst_rel_grad_diff": worst,
                                   "zero3_params": a["ds_params"], "untied": untie}))
# Leave the process group before the interpreter exits: its gloo threads still running at exit made the process
# abort ("terminate called without an active exception", exit -6) once in a full suite run after both RESULT lines.
sys.stdout.flush()
torch.distributed.destroy_process_group()
