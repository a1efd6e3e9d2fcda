"""Hub names: a checkpoint named `org/name[@revision]` resolves from the local Hugging Face cache only (a fake
cache layout here: models--org--name/refs, snapshots/<commit>/ linking into blobs/), a path on disk wins, an
absent model is one line naming it and the cache searched, and a snapshot may not link out of the cache."""
import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from factories import perturbed, random_model
from safesub_core import settings
from safesub_core.checkpoints import Checkpoint, TensorReader
from safesub_core.errors import SafesubError
from safesub_core.family import Family, paths_spec, resolve_family
from safesub_core.hub import hub_name, hub_snapshot

COMMIT = "a" * 40
OTHER = "b" * 40


def hub_model(cache: Path, repo: str, model, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Save `model` into the hub cache layout as huggingface_hub writes it; returns the snapshot folder."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    staged = storage / "staged"
    model.save_pretrained(staged, safe_serialization=True)
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for f in sorted(staged.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    staged.rmdir()
    if ref:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A hub cache under tmp_path/hf with org/base, org/aligned and org/useful (main), org/useful@v2 (a branch)."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    base = random_model(0)
    aligned = perturbed(base, 1)
    hub_model(cache, "org/base", base)
    hub_model(cache, "org/aligned", aligned)
    hub_model(cache, "org/useful", perturbed(aligned, 10))
    hub_model(cache, "org/useful", perturbed(aligned, 11), commit=OTHER, ref="v2")
    return cache


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_family_file(folder: Path, **checkpoints) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = dict(base=checkpoints.pop("base"), aligned=checkpoints.pop("aligned"), variants=checkpoints)
    (folder / "family.yaml").write_text(yaml.safe_dump(spec))
    return folder / "family.yaml"


def test_hub_name_reads_org_name_and_revision():
    assert hub_name("meta-llama/Llama-3.2-1B-Instruct") == ("meta-llama/Llama-3.2-1B-Instruct", None)
    assert hub_name("org/name@v2") == ("org/name", "v2")
    assert hub_name("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for text in ("name", "./org/name", "/abs/org", "~/org/name", "a/b/c", "org/name@../../x", "org--x/y", "org/",
                 "org/name.git", "org/name@"):
        assert hub_name(text) is None, text
    assert hub_name(Path("org/name")) is None  # a Path is a path


def test_hub_cache_is_found_as_huggingface_hub_finds_it(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert settings.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert settings.hub_cache() == tmp_path / "cache"


def test_a_family_file_names_hub_models(hub, tmp_path, no_network):
    path = write_family_file(tmp_path / "fam", base="org/base", aligned="org/aligned", useful="org/useful",
                             useful_v2="org/useful@v2", pinned=f"org/useful@{OTHER}")
    family = Family.from_file(path)
    assert family.base.path == (hub / "models--org--base" / "snapshots" / COMMIT).resolve()
    assert family.checkpoint("useful").path.name == COMMIT
    assert family.checkpoint("useful_v2").path.name == OTHER and family.checkpoint("pinned").path.name == OTHER
    assert {c.kind for c in family.checkpoints().values()} == {"hf"}
    family.validate()
    reader = TensorReader(family.checkpoint("useful"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not reader.get(name).equal(TensorReader(family.checkpoint("useful_v2")).get(name))
    # the same files as the model saved to a folder: the same fingerprint
    folder = tmp_path / "saved"
    perturbed(perturbed(random_model(0), 1), 10).save_pretrained(folder, safe_serialization=True)
    assert family.checkpoint("useful").fingerprint() == Checkpoint.resolve("useful", folder).fingerprint()


def test_a_model_not_in_the_cache_is_one_line_naming_it_and_the_cache(hub, tmp_path, no_network):
    with pytest.raises(SafesubError) as err:
        Family.from_file(write_family_file(tmp_path / "fam", base="org/base", aligned="meta-llama/Llama-3.2-1B",
                                           useful="org/useful"))
    text = str(err.value)
    assert "\n" not in text and "checkpoint 'aligned'" in text and "meta-llama/Llama-3.2-1B" in text
    assert str(hub) in text and "not in the local Hugging Face cache" in text
    with pytest.raises(SafesubError, match=r"org/useful@v9: is not in the local Hugging Face cache"):
        hub_snapshot("useful", "org/useful@v9")
    (hub / "models--org--base" / "refs" / "main").write_text("c" * 40)  # a ref to a snapshot that is not there
    with pytest.raises(SafesubError, match="hub model org/base: is not in the local"):
        hub_snapshot("base", "org/base")


def test_a_path_on_disk_wins_over_a_hub_name(hub, tmp_path, monkeypatch):
    fam = tmp_path / "fam"
    random_model(3).save_pretrained(fam / "org" / "base", safe_serialization=True)
    family = Family.from_file(write_family_file(fam, base="org/base", aligned="org/aligned", useful="org/useful"))
    assert family.base.path == (fam / "org" / "base").resolve()
    assert family.aligned.path.name == COMMIT
    # entered paths: relative to the working folder
    monkeypatch.chdir(fam)
    entered = resolve_family(paths_spec("org/base", "org/aligned", None, "aligned", {"useful": "org/useful"}))
    assert entered.base.path == (fam / "org" / "base").resolve() and entered.aligned.path.name == COMMIT


def test_confined_hub_snapshots_are_allowed_but_links_must_stay_in_the_cache(hub, tmp_path, monkeypatch):
    roots = tmp_path / "roots"
    roots.mkdir()
    monkeypatch.setenv("SAFESUB_ROOTS", str(roots))  # the hub cache is outside the allowed roots
    monkeypatch.chdir(roots)
    spec = paths_spec("org/base", "org/aligned", None, "aligned", {"useful": "org/useful@v2"})
    family = resolve_family(spec, confined=True)
    assert family.checkpoint("useful").path.name == OTHER
    with pytest.raises(SafesubError, match="outside the allowed folders"):  # a real path outside the roots: refused
        resolve_family(paths_spec(str(hub / "models--org--base" / "snapshots" / COMMIT), "org/aligned", None,
                                  "aligned", {"useful": "org/useful"}), confined=True)
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    config = hub / "models--org--useful" / "snapshots" / COMMIT / "config.json"
    config.unlink()
    config.symlink_to(outside)
    with pytest.raises(SafesubError) as err:
        resolve_family(paths_spec("org/base", "org/aligned", None, "aligned", {"useful": "org/useful"}),
                       confined=True)
    assert "\n" not in str(err.value)
    assert f"checkpoint 'useful': hub model org/useful: config.json links to {outside}, outside the Hugging Face " \
           f"cache" in str(err.value)
