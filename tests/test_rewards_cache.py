"""Reward weights published to the object store (file:// and a real SeaweedFS S3) and loaded back, verified."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from mixgrpo import cli
from mixgrpo.rewards import build_reward
from mixgrpo.rewards.cache import cache_reward_weights, missing_files, resolve_weights_dir
from mixgrpo.storage import MANIFEST_NAME, IntegrityError, NotFoundError, open_store, read_manifest, sha256_file
from services import S3Endpoint
from test_rewards_clip import PROMPTS, images_batch, make_hps_dir
from test_rewards_imagereward import make_imagereward_dir

AWS_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
    "MIXGRPO_S3_SECRET_DIR",
)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hps_dir(tmp_path_factory.mktemp("hps-src"))


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def dest(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store prefix per backend; S3 settings come from the environment."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    if request.param == "file":
        return (tmp_path / "store" / "rewards").as_uri()
    ep: S3Endpoint = request.getfixturevalue("s3_server")
    for name, value in ep.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{ep.bucket}/rewards-{uuid.uuid4().hex[:8]}"


def test_publish_then_load_gives_the_same_scores(hps_dir: Path, dest: str, tmp_path: Path) -> None:
    uri = cache_reward_weights("hps", hps_dir, dest, "v2.1")
    assert uri == f"{dest}/hps/v2.1"
    manifest = read_manifest(uri)
    files = {f.path: f for f in manifest.files}
    assert set(files) == {p.relative_to(hps_dir).as_posix() for p in hps_dir.rglob("*") if p.is_file()}
    assert files["HPS_v2.1_compressed.pt"].sha256 == sha256_file(hps_dir / "HPS_v2.1_compressed.pt")
    assert dict(manifest.metadata) == {"reward": "hps", "version": "v2.1", "source": str(hps_dir)}

    images = images_batch()
    from_store = build_reward("hps", weights_dir=uri, cache_dir=tmp_path / "cache")(images, PROMPTS)
    local = build_reward("hps", weights_dir=hps_dir)(images, PROMPTS)
    torch.testing.assert_close(from_store, local, atol=0, rtol=0)


def test_the_local_copy_is_fetched_once_and_repaired_when_damaged(hps_dir: Path, tmp_path: Path) -> None:
    uri = cache_reward_weights("hps", hps_dir, (tmp_path / "store").as_uri(), "v1")
    first = resolve_weights_dir(uri, cache_dir=tmp_path / "cache")
    checkpoint = first / "HPS_v2.1_compressed.pt"
    stamp = checkpoint.stat().st_mtime_ns
    again = resolve_weights_dir(uri, cache_dir=tmp_path / "cache")
    assert again == first and checkpoint.stat().st_mtime_ns == stamp  # reused, not downloaded again
    data = bytearray(checkpoint.read_bytes())
    data[-1] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    resolve_weights_dir(uri, cache_dir=tmp_path / "cache")
    assert sha256_file(checkpoint) == sha256_file(hps_dir / "HPS_v2.1_compressed.pt")


def test_a_modified_object_fails_loading_with_the_file_named(hps_dir: Path, tmp_path: Path) -> None:
    uri = cache_reward_weights("hps", hps_dir, (tmp_path / "store").as_uri(), "v1")
    store = open_store(uri)
    data = bytearray(store.get_bytes("HPS_v2.1_compressed.pt"))
    data[100] ^= 0xFF  # same size, different bytes
    store.put_bytes("HPS_v2.1_compressed.pt", bytes(data))
    with pytest.raises(IntegrityError, match=r"HPS_v2\.1_compressed\.pt: sha256 .* does not match MANIFEST\.json"):
        build_reward("hps", weights_dir=uri, cache_dir=tmp_path / "cache")


def test_a_missing_object_or_manifest_fails_loading_clearly(hps_dir: Path, tmp_path: Path) -> None:
    uri = cache_reward_weights("hps", hps_dir, (tmp_path / "store").as_uri(), "v1")
    store = open_store(uri)
    store.delete("tokenizer.json")
    with pytest.raises(IntegrityError, match=r"tokenizer\.json is listed in MANIFEST\.json but missing"):
        build_reward("hps", weights_dir=uri, cache_dir=tmp_path / "cache-a")
    store.delete(MANIFEST_NAME)
    with pytest.raises(NotFoundError, match="no MANIFEST.json .* incomplete"):
        build_reward("hps", weights_dir=uri, cache_dir=tmp_path / "cache-b")


def test_caching_again_is_a_no_op_and_a_change_republishes(hps_dir: Path, tmp_path: Path) -> None:
    dest = (tmp_path / "store").as_uri()
    uri = cache_reward_weights("hps", hps_dir, dest, "v1")
    manifest_path = Path(open_store(uri).uri_for(MANIFEST_NAME).removeprefix("file://"))
    before = manifest_path.read_bytes(), manifest_path.stat().st_mtime_ns
    cache_reward_weights("hps", hps_dir, dest, "v1")
    assert (manifest_path.read_bytes(), manifest_path.stat().st_mtime_ns) == before
    changed = tmp_path / "changed"
    make_hps_dir(changed, seed=5)
    cache_reward_weights("hps", changed, dest, "v1")
    entry = {f.path: f for f in read_manifest(uri).files}["HPS_v2.1_compressed.pt"]
    assert entry.sha256 == sha256_file(changed / "HPS_v2.1_compressed.pt")


def test_source_may_be_a_published_uri_or_a_plain_prefix(tmp_path: Path) -> None:
    src = make_imagereward_dir(tmp_path / "ir")
    plain = tmp_path / "mirror"  # a hub mirror: files, no manifest
    open_store(plain.as_uri()).put_dir(src)
    first = cache_reward_weights("imagereward", plain.as_uri(), (tmp_path / "a").as_uri(), "v1.0")
    second = cache_reward_weights("imagereward", first, (tmp_path / "b").as_uri(), "v1.0")
    assert {(f.path, f.sha256) for f in read_manifest(first).files} == {(f.path, f.sha256) for f in read_manifest(second).files}
    reward = build_reward("imagereward", weights_dir=second, cache_dir=tmp_path / "cache")
    assert torch.isfinite(reward(torch.rand(2, 3, 40, 40), ["a cat", "a dog"])).all()


def test_incomplete_sources_and_bad_arguments_are_refused_before_upload(hps_dir: Path, tmp_path: Path) -> None:
    dest = (tmp_path / "store").as_uri()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "HPS_v2.1_compressed.pt").write_bytes((hps_dir / "HPS_v2.1_compressed.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lacks tokenizer\.json\|vocab\.json\+merges\.txt"):
        cache_reward_weights("hps", partial, dest, "v1")
    with pytest.raises(ValueError, match="UnifiedReward runs behind its own server"):
        cache_reward_weights("unified", hps_dir, dest, "v1")
    with pytest.raises(ValueError, match="version 'v1/x'"):
        cache_reward_weights("hps", hps_dir, dest, "v1/x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        cache_reward_weights("hps", tmp_path / "nope", dest, "v1")
    assert not (tmp_path / "store").exists()
    assert missing_files("clip", hps_dir) == ["config.json|open_clip_config.json+open_clip_pytorch_model.bin"]


def test_cli_rewards_cache(dest: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_imagereward_dir(tmp_path / "ir")
    code = cli.main(["rewards", "cache", "--name", "imagereward", "--source", str(src), "--dest", dest, "--version", "v1.0"])
    assert code == 0
    uri = capsys.readouterr().out.strip()
    assert uri == f"{dest}/imagereward/v1.0"
    assert {f.path for f in read_manifest(uri).files} == {"ImageReward.pt", "med_config.json", "vocab.txt"}
    assert json.loads(open_store(uri).get_bytes("med_config.json"))["add_cross_attention"] is True
    code = cli.main(["rewards", "cache", "--name", "imagereward", "--source", str(tmp_path), "--dest", dest, "--version", "v1.0"])
    assert code == 2 and "lacks ImageReward.pt" in capsys.readouterr().err
