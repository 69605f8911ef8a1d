"""Which keys count as secrets, and that redacted copies keep everything else as it was."""

from selfalign_ray.redaction import REDACTED, is_secret_key, redact, redact_overrides


def test_secret_keys_are_found_by_whole_name_parts():
    for key in ["hf_token", "engine.extra.HF_TOKEN", "WANDB_API_KEY", "aws_secret_access_key", "password",
                "tracker.mlflow.api-key", "db.passwd", "github_pat.token", "client_secret"]:
        assert is_secret_key(key), key
    for key in ["max_tokens", "mode.respond.max_tokens", "train.logprob_chunk_tokens", "tokenizer", "key",
                "api", "keywords_per_paragraph", "num_tokens", "secretary_name"]:
        assert not is_secret_key(key), key


def test_redact_replaces_only_secret_values_at_any_depth():
    cfg = {"engine": {"extra": {"hf_token": "hf_abc", "max_model_len": 4096}},
           "runs": [{"api_key": "k1", "name": "a"}], "mode": {"respond": {"max_tokens": 128}}, "token": None}
    out = redact(cfg)
    assert out == {"engine": {"extra": {"hf_token": REDACTED, "max_model_len": 4096}},
                   "runs": [{"api_key": REDACTED, "name": "a"}], "mode": {"respond": {"max_tokens": 128}},
                   "token": None}
    assert cfg["engine"]["extra"]["hf_token"] == "hf_abc"  # a copy: the live config keeps its value


def test_overrides_keep_their_key_and_lose_the_secret():
    assert redact_overrides(["engine.extra.hf_token=hf_abc", "+x.api_key=sk-1", "mode.respond.max_tokens=64",
                             "~y.password", "dataset_size=8"]) == \
        ["engine.extra.hf_token=<redacted>", "+x.api_key=<redacted>", "mode.respond.max_tokens=64",
         "~y.password", "dataset_size=8"]
