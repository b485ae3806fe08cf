"""`entitylens cache --random-init SEED` + `entitylens probe --random-cache`: the random-model control."""

import csv
import json

import torch

from entitylens.activations import load_cache
from entitylens.cli import main
from entitylens.task import GeneratorConfig, generate_dataset


def _cache(data, out, *extra):
    args = ["--quiet", "cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post",
            "--roles", "query_box", "--out", str(out), *extra]
    assert main(args) == 0


def test_random_init_cache_is_marked_seeded_and_feeds_the_probe_control(tmp_path):
    data = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=4, num_states=30, num_operations=2), data)
    _cache(data, tmp_path / "trained")
    _cache(data, tmp_path / "rand_a", "--random-init", "3")
    _cache(data, tmp_path / "rand_b", "--random-init", "3")

    meta = json.loads((tmp_path / "rand_a" / "meta.json").read_text())
    assert meta["model"]["spec"] == "tiny:llama#random-init-3"
    trained = load_cache(tmp_path / "trained").features("resid_post", "query_box")
    rand = load_cache(tmp_path / "rand_a").features("resid_post", "query_box")
    assert trained.shape == rand.shape and not torch.allclose(trained, rand)
    # Same seed, same re-initialised weights: byte-identical shards.
    for shard in sorted((tmp_path / "rand_a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "rand_b" / shard.name).read_bytes()

    out = tmp_path / "probe"
    assert main(["--quiet", "probe", "--cache", str(tmp_path / "trained"), "--target", "box_contents",
                 "--roles", "query_box", "--random-cache", str(tmp_path / "rand_a"), "--bootstrap", "0",
                 "--out", str(out)]) == 0
    with open(out / "probe.csv", newline="") as f:
        metrics = {r["metric"] for r in csv.DictReader(f)}
    assert any(m.startswith("random_model") for m in metrics) and "over_random" in metrics
