"""Every bad input to the Python API fails early with a ValueError naming the field, the value and
what is allowed: config files, config dicts and dataclass fields, calibrations of another model,
model names and load options, text files (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from kvsqueeze.config import PRESETS, CacheConfig, LayerOverride, preset, resolve_config
from kvsqueeze.config_file import model_fingerprint
from kvsqueeze.eval.text import load_text, read_text_file
from kvsqueeze.models import DEFAULT_MODEL, load_model, resolve_model
from kvsqueeze.policies.plan import TokenPolicy
from kvsqueeze.quant.spec import QuantSpec

SMOLLM2 = dict(
    num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)  # fmt: skip


def smollm2() -> LlamaConfig:
    return LlamaConfig(**SMOLLM2)


def refused(make, *fragments: str) -> str:
    """Call ``make``; it must raise ValueError whose message holds every fragment. Returns the message."""
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def calibrated(layers: int = 2) -> CacheConfig:
    low = QuantSpec(bits=2, axis="channel", group_size=32)
    return preset("k4v4").replace(layer_overrides=tuple(LayerOverride(i, low, None) for i in range(layers)))


# ------------------------------------------------------------------------------------- config files

BAD_FILES = [
    # (id, bytes written, fragments of the message besides the file name)
    ("empty", b"", ["is empty"]),
    ("whitespace", b"  \n\t\n", ["is empty"]),
    ("truncated-object", b'{"key": ', ["not valid JSON", "line 1"]),
    ("single-quotes", b"{'sink_tokens': 4}", ["not valid JSON"]),
    ("trailing-comma", b'{"sink_tokens": 4,}', ["not valid JSON"]),
    ("two-lines-bad", b'{\n  "sink_tokens": 4\n  "block_size": 64}', ["not valid JSON", "line 3"]),
    ("binary", bytes(range(256)), ["not UTF-8"]),
    ("latin-1", '{"note": "caf\u00e9"}'.encode("latin-1"), ["not UTF-8"]),
    ("number", b"42", ["holds a JSON number", "JSON object of CacheConfig fields"]),
    ("float", b"4.5", ["holds a JSON number"]),
    ("list", b"[1, 2]", ["holds a JSON array"]),
    ("string", b'"k4v4"', ["holds a JSON string"]),
    ("null", b"null", ["holds a JSON null"]),
    ("calibration-without-config", b'{"calibration": {"tokens": [0, 10]}}', ['without its "config" entry']),
    ("config-entry-list", b'{"config": [1], "calibration": {}}', ['"config" entry is a JSON array']),
    ("unknown-key", b'{"window": 64}', ["unknown keys ['window']", "residual_window"]),
    ("bad-field", b'{"sink_tokens": true}', ["sink_tokens", "True"]),
    ("bad-nested-spec", b'{"key": {"bits": 5}}', ["key", "bits", "5"]),
    ("override-missing-keys", b'{"layer_overrides": [{"layer": 0}]}', ["layer_overrides[0]", "missing keys"]),
]


@pytest.mark.parametrize(("content", "fragments"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
@pytest.mark.parametrize("reader", [CacheConfig.load, resolve_config], ids=["load", "resolve_config"])
def test_bad_config_files_name_the_file(tmp_path: Path, reader, content: bytes, fragments: list[str]) -> None:
    path = tmp_path / "cfg.json"
    path.write_bytes(content)
    refused(lambda: reader(str(path)), repr(str(path)), *fragments)


@pytest.mark.parametrize("name", ["missing.json", "sub/missing.json", "no/such/dir/cfg.json"])
def test_missing_config_file_does_not_exist(tmp_path: Path, name: str) -> None:
    refused(lambda: CacheConfig.load(tmp_path / name), "config file", "does not exist")
    refused(lambda: resolve_config(str(tmp_path / name)), "config file", "does not exist")


@pytest.mark.parametrize("make_dir", [lambda p: p, lambda p: p / "cfg.json"])
def test_config_directory_is_a_directory_not_missing(tmp_path: Path, make_dir) -> None:
    folder = make_dir(tmp_path)
    folder.mkdir(exist_ok=True)
    message = refused(lambda: CacheConfig.load(folder), "is a directory", "JSON object")
    assert "does not exist" not in message


@pytest.mark.parametrize("path", [None, 42, "", ["cfg.json"]])
def test_config_file_path_must_be_a_path(path: object) -> None:
    refused(lambda: CacheConfig.load(path), "config file", repr(path))


# ------------------------------------------------------------------- config files work like presets


@pytest.mark.parametrize("form", ["str", "path", "no-suffix"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "calibration"])
def test_resolve_config_loads_config_files(tmp_path: Path, monkeypatch, form: str, wrapped: bool) -> None:
    config = calibrated()
    data = {"config": config.to_dict(), "calibration": {"tokens": [0, 10]}} if wrapped else config.to_dict()
    path = tmp_path / ("cfg" if form == "no-suffix" else "cfg.json")
    path.write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    given = {"str": str(path), "path": path, "no-suffix": "cfg"}[form]  # an existing file by relative name
    assert resolve_config(given) == config
    assert resolve_config(given, head_dim=64) == config  # files are the user's explicit choice: not fitted


def test_a_preset_name_wins_over_a_file_of_that_name(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "k4v4").write_text("not json")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("k4v4") is PRESETS["k4v4"]


@pytest.mark.parametrize("name", ["k3v3", "K4V4", "k4v4 ", "best-5bit", ""])
@pytest.mark.parametrize("lookup", [preset, resolve_config])
def test_unknown_preset_lists_presets_and_json_paths(lookup, name: str) -> None:
    message = refused(lambda: lookup(name), repr(name), ".json", "'k4v2'", "'h2o-50'")
    assert "preset" in message


@pytest.mark.parametrize("value", [None, 42, 4.5, ["k4v4"], ("k4v4",), b"k4v4"])
def test_resolve_config_refuses_other_types(value: object) -> None:
    refused(lambda: resolve_config(value), "config", "preset name", ".json")
    refused(lambda: preset(value), "preset", "is unknown")


# ---------------------------------------------------------------- calibrations made for another model

OTHER_MODELS = [
    ("qwen2-24-layers", Qwen2Config(num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                                    num_key_value_heads=2), ["num_hidden_layers 24", "(this model: 30)", "qwen2"]),
    ("llama-more-layers", LlamaConfig(**{**SMOLLM2, "num_hidden_layers": 32}), ["num_hidden_layers 32"]),
    ("llama-other-kv-heads", LlamaConfig(**{**SMOLLM2, "num_key_value_heads": 9}), ["num_key_value_heads 9"]),
    ("llama-other-head-dim", LlamaConfig(**{**SMOLLM2, "head_dim": 128}), ["head_dim 128"]),
    ("llama-other-vocab", LlamaConfig(**{**SMOLLM2, "vocab_size": 32000}), ["vocab_size 32000"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("made_for", "fragments"), [m[1:] for m in OTHER_MODELS], ids=[m[0] for m in OTHER_MODELS]
)
@pytest.mark.parametrize("layout", ["top-level-model", "calibration-entry", "config-field"])
def test_calibration_of_another_model_is_refused(
    tmp_path: Path, made_for, fragments: list[str], layout: str
) -> None:
    config = calibrated(layers=made_for.num_hidden_layers)
    fingerprint = model_fingerprint(made_for)
    data = {
        "top-level-model": {"model": fingerprint, "config": config.to_dict(), "calibration": {}},
        "calibration-entry": {"config": config.to_dict(), "calibration": {"model_fingerprint": fingerprint}},
        "config-field": {**config.to_dict(), "model_fingerprint": fingerprint},
    }[layout]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(data))
    loaded = resolve_config(str(path))
    assert dict(loaded.model_fingerprint) == fingerprint
    loaded.check_model(made_for.num_key_value_heads, 64, made_for.num_hidden_layers, model_config=made_for)
    refused(
        lambda: loaded.check_model(3, 64, 30, model_config=smollm2()),
        "model_fingerprint",
        "calibrated for another model",
        "kvsqueeze calibrate",
        *fragments,
    )


def test_fingerprint_round_trips_and_hand_written_configs_stay_accepted() -> None:
    config = calibrated().replace(model_fingerprint=model_fingerprint(smollm2()))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["model_fingerprint"]["num_hidden_layers"] == 30
    assert CacheConfig.from_dict(data) == config
    config.check_model(3, 64, 30, model_config=smollm2())
    hand_written = calibrated()  # no fingerprint: any model, layer count checked from its overrides
    assert "model_fingerprint" not in hand_written.to_dict()
    hand_written.check_model(3, 64, 30, model_config=smollm2())
    refused(
        lambda: calibrated(layers=31).check_model(3, 64, 30, model_config=smollm2()), "layers [30]", "0 .. 29"
    )


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ({"num_layers": 30}, ["unknown fields ['num_layers']", "num_hidden_layers"]),
        ({"num_hidden_layers": [30]}, ["model_fingerprint.num_hidden_layers", "[30]"]),
        ({"head_dim": True}, ["model_fingerprint.head_dim", "True"]),
        ("llama", ["model_fingerprint", "'llama'"]),
        (42, ["model_fingerprint", "42"]),
    ],
)
def test_bad_fingerprints_are_refused(value: object, fragments: list[str]) -> None:
    refused(lambda: CacheConfig(model_fingerprint=value), *fragments)


@pytest.mark.parametrize("model_config", [None, {"num_hidden_layers": 30}, "llama"])
def test_fingerprint_needs_a_transformers_config(model_config: object) -> None:
    if model_config is None:  # None: no fingerprint check at all
        calibrated().replace(model_fingerprint={"num_hidden_layers": 24}).check_model(
            3, 64, 30, model_config=None
        )
        return
    config = calibrated().replace(model_fingerprint={"num_hidden_layers": 24})
    refused(
        lambda: config.check_model(3, 64, 30, model_config=model_config), "model_config", "PretrainedConfig"
    )


def test_squeezed_cache_refuses_a_calibration_of_another_model(tmp_path: Path) -> None:
    """Needs `SqueezedCache.__init__` to pass ``model_config=model_config`` to `check_model`."""
    from kvsqueeze import SqueezedCache

    qwen = Qwen2Config(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2)
    path = tmp_path / "qwen-calib.json"
    path.write_text(json.dumps({"model": model_fingerprint(qwen), "config": calibrated(24).to_dict()}))
    refused(lambda: SqueezedCache(str(path), smollm2()), "model_fingerprint", "num_hidden_layers 24")
    assert SqueezedCache("best-3bit", smollm2()).cache_config.model_fingerprint  # bundled: matches


# ------------------------------------------------------------------------- dicts that are not dicts


@pytest.mark.parametrize("data", ["k4v4", 42, 4.5, None, [1, 2], ("key",), True])
@pytest.mark.parametrize(
    ("from_dict", "label"),
    [(CacheConfig.from_dict, "CacheConfig"), (QuantSpec.from_dict, "QuantSpec"),
     (TokenPolicy.from_dict, "tokens"), (LayerOverride.from_dict, "layer_overrides")],
)  # fmt: skip
def test_from_dict_wants_a_dict(from_dict, label: str, data: object) -> None:
    message = refused(lambda: from_dict(data), label, "expected a dict (JSON object)", type(data).__name__)
    assert "unknown keys" not in message


def test_from_dict_of_a_preset_name_points_to_resolve_config() -> None:
    refused(lambda: CacheConfig.from_dict("k4v4"), "got str 'k4v4'", "resolve_config")


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ([{"layer": 0}], ["layer_overrides[0]", "missing keys ['key', 'value']"]),
        ([{"key": None, "value": None}], ["layer_overrides[0]", "missing keys ['layer']"]),
        ([{"layer": 0, "key": None, "value": None}, {"layer": 1}], ["layer_overrides[1]", "missing"]),
        (
            [{"layer": 0, "key": None, "value": None, "bits": 2}],
            ["layer_overrides[0]", "unknown keys ['bits']"],
        ),
        ([{"layer": 0, "key": {"bits": 5}, "value": None}], ["layer_overrides[0].key", "bits", "5"]),
        ([{"layer": -1, "key": None, "value": None}], ["layer_overrides.layer", "-1"]),
        ([{"layer": True, "key": None, "value": None}], ["layer_overrides.layer", "True"]),
        ([{"layer": 1.0, "key": None, "value": None}], ["layer_overrides.layer", "1.0"]),
        ([3], ["layer_overrides[0]", "3"]),
        (5, ["layer_overrides", "5", "must be a list"]),
        ("layers", ["layer_overrides", "'layers'", "must be a list"]),
        ({"layer": 0, "key": None, "value": None}, ["layer_overrides", "must be a list"]),
        ([{"layer": 0, "key": None, "value": None}] * 2, ["layers [0, 0] repeat"]),
    ],
)
def test_bad_layer_overrides(overrides: object, fragments: list[str]) -> None:
    refused(lambda: CacheConfig(layer_overrides=overrides), *fragments)
    refused(lambda: CacheConfig.from_dict({"layer_overrides": overrides}), *fragments)


@pytest.mark.parametrize("data", [{1: 2}, {"sink_tokens": 4, 7: 1}, {None: 1}])
def test_non_string_keys_are_unknown_keys(data: dict) -> None:
    refused(lambda: CacheConfig.from_dict(data), "unknown keys")


# -------------------------------------------------------------- every field refuses the wrong type

FIELDS = [
    # (callable given the bad value, bad values, the field the message names)
    (lambda v: QuantSpec(bits=v), [True, 4.0, "4", None, 5, 0], "bits"),
    (lambda v: QuantSpec(axis=v), ["row", 1, None, ["token"]], "axis"),
    (lambda v: QuantSpec(group_size=v), [True, 64.0, "64", 0, -64, None], "group_size"),
    (lambda v: QuantSpec(symmetric=v), ["no", "yes", 1, 0, None, "false"], "symmetric"),
    (lambda v: QuantSpec(format=v), ["fp4", 4, None, ["int"]], "format"),
    (lambda v: QuantSpec(scale_dtype=v), ["float64", torch.float16, ["float16"], {"x": 1}, None], "scale_dtype"),
    (lambda v: QuantSpec(bits=2, format="nf", codebook=v),
     ["abcd", ["a", "b", "c", "d"], [True, False, True, False], [-1, 0, 1], 4, [-1, -0.5, 0.5, 2]], "codebook"),
    (lambda v: QuantSpec(outlier_fraction=v), [True, -0.1, 0.5, "0.01", float("nan"), None], "outlier_fraction"),
    (lambda v: QuantSpec(outlier_tokens=v), [True, 0, -64, 64.0, "64"], "outlier_tokens"),
    (lambda v: LayerOverride(layer=v, key=None, value=None), [True, -1, 1.0, "0", None], "layer"),
    (lambda v: LayerOverride(layer=0, key=v, value=None), ["int4", 4, ["bits"]], "key"),
    (lambda v: CacheConfig(key=v), ["int4", 4, True], "key"),
    (lambda v: CacheConfig(value=v), ["int2", 2, False], "value"),
    (lambda v: CacheConfig(sink_tokens=v), [True, False, 4.0, -1, "4", None], "sink_tokens"),
    (lambda v: CacheConfig(residual_window=v), [True, 128.0, -64, "128", None], "residual_window"),
    (lambda v: CacheConfig(block_size=v, residual_window=0, page_tokens=1024), [True, 0, -64, 64.0, "64"],
     "block_size"),
    (lambda v: CacheConfig(page_tokens=v), [True, 0, -1024, 1024.0, 1000, "1024"], "page_tokens"),
    (lambda v: CacheConfig(rotate_keys=v), [1, 0, "yes", None], "rotate_keys"),
    (lambda v: CacheConfig(rotate_values=v), [1, "no", None], "rotate_values"),
    (lambda v: CacheConfig(pre_rope_keys=v), [1, "true", None], "pre_rope_keys"),
    (lambda v: CacheConfig(rotation_seed=v), [True, 1.5, -1, 2**64, "0", None], "rotation_seed"),
    (lambda v: CacheConfig(tokens=v), ["h2o", 1, [1]], "tokens"),
    (lambda v: TokenPolicy(default=v), ["high-ish", 1, None], "tokens.default"),
    (lambda v: TokenPolicy(roles=v), ["text", [1, 2], {1: "exact"}, {"text": 1}, 5], "tokens.roles"),
    (lambda v: TokenPolicy(roles=v), [{"txt": "exact"}, {"text": "precise"}], "roles[0]"),
    (lambda v: TokenPolicy(scorer=v), ["l2", 1, None, ["knorm"]], "tokens.scorer"),
    (lambda v: TokenPolicy(observe_window=v), [True, 0, -1, 32.0, "32"], "tokens.observe_window"),
    (lambda v: TokenPolicy(pool_size=v), [True, 0, 2, 3.0, "3"], "pool_size"),
    (lambda v: TokenPolicy(scorer="knorm", keep_exact=v), [True, -1, 1.5, float("nan"), "0.1"], "tokens.keep_exact"),
    (lambda v: TokenPolicy(scorer="knorm", keep_high=v), [True, -0.1, 2, float("nan"), "0.1"], "tokens.keep_high"),
    (lambda v: TokenPolicy(scorer="knorm", evict=v), [True, -0.1, 1.5, float("inf"), None], "tokens.evict"),
    (lambda v: TokenPolicy(high_key=v), ["int8", 8], "tokens.high_key"),
    (lambda v: TokenPolicy(exact_dtype=v), ["float64", torch.float16, ["float16"], 16], "tokens.exact_dtype"),
    (lambda v: TokenPolicy(scorer="knorm", layer_keep_exact=v),
     ["abc", 5, {"x": 0.5}, {-1: 0.5}, {0: 2.0}, {True: 0.5}, {"\u00b2": 0.5}], "tokens.layer_keep_exact"),
]  # fmt: skip
FIELD_CASES = [
    pytest.param(make, value, name, id=f"{name}-{value!r}"[:60])
    for make, values, name in FIELDS
    for value in values
]


@pytest.mark.parametrize(("make", "value", "field"), FIELD_CASES)
def test_every_field_refuses_wrong_values(make, value: object, field: str) -> None:
    refused(lambda: make(value), field)


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        (lambda: preset("k4v4").check_model(0, 64, 2), ["num_kv_heads", "0"]),
        (lambda: preset("k4v4").check_model(2, "64", 2), ["head_dim", "'64'"]),
        (lambda: preset("k4v4").check_model(2, 64, 0), ["num_layers", "0"]),
        (lambda: preset("k4v4").check_model(2, 64.0, 2), ["head_dim", "64.0"]),
        (lambda: preset("k4v4").bytes_per_token(0, 2, 64), ["num_layers", "0"]),
        (lambda: preset("k4v4").bytes_per_token(2, True, 64), ["num_kv_heads", "True"]),
        (lambda: calibrated().bits_per_element(num_layers=0), ["num_layers", "0"]),
        (lambda: preset("k4v4").for_head_dim(0), ["head_dim", "0"]),
        (lambda: preset("k4v4").replace(window=64), ["unknown fields ['window']", "residual_window"]),
        (lambda: resolve_config("k4v4", head_dim=True), ["head_dim", "True"]),
    ],
)
def test_methods_refuse_bad_arguments(call, fragments: list[str]) -> None:
    refused(call, *fragments)


@pytest.mark.parametrize(
    "config",
    [CacheConfig(sink_tokens=0, residual_window=0), CacheConfig(rotation_seed=2**64 - 1),
     CacheConfig(key=None, value=None, layer_overrides=None),
     TokenPolicy(scorer="knorm", keep_exact=5), TokenPolicy(scorer="knorm", layer_keep_exact={"3": 1})],
)  # fmt: skip
def test_edge_values_stay_accepted(config: object) -> None:
    assert config is not None


# ------------------------------------------------------------------------- models and load options


@pytest.fixture
def no_weights(monkeypatch):
    """Make any attempt to load weights fail loudly: the refusals must come before it."""
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained was called before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


@pytest.mark.parametrize("content", [[], ["tokenizer.json"], ["model.safetensors", "weights.bin"]])
def test_folder_without_config_json(tmp_path: Path, no_weights, content: list[str]) -> None:
    for name in content:
        (tmp_path / name).write_text("{}")
    message = refused(
        lambda: load_model(str(tmp_path)), repr(str(tmp_path)), "has no config.json", DEFAULT_MODEL
    )
    assert "does not exist" not in message and "model_type" not in message


@pytest.mark.parametrize("name", ["./no-such-model", "~/no-such-kvsqueeze-model", "/no/such/model", "a/b/c"])
def test_missing_paths_do_not_exist(no_weights, name: str) -> None:
    refused(lambda: load_model(name), "model: path", "does not exist", DEFAULT_MODEL, "GGUF")


@pytest.mark.parametrize("suffix", [".txt", ".json", ".bin"])
def test_a_file_that_is_not_gguf(tmp_path: Path, no_weights, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_text("x")
    message = refused(lambda: load_model(str(path)), "not a GGUF file", DEFAULT_MODEL)
    assert "does not exist" not in message


def test_a_gguf_file_resolves_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_model(str(path)) == path


@pytest.mark.parametrize("name", [None, 42, "", "   ", "has space", "org/na me", "org/name/"])
def test_bad_model_names(no_weights, name: object) -> None:
    refused(lambda: load_model(name), "model", DEFAULT_MODEL)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (
            {"attn_implementation": "fused"},
            ["attn_implementation", "'fused'", "'kvsqueeze'", "'sdpa'", "'eager'"],
        ),
        ({"attn_implementation": "reference"}, ["attn_implementation", "'reference'", "'kvsqueeze'"]),
        ({"attn_implementation": "SDPA"}, ["attn_implementation", "'SDPA'"]),
        ({"attn_implementation": 1}, ["attn_implementation", "1"]),
        ({"dtype": torch.int8}, ["dtype", "torch.int8", "torch.float32"]),
        ({"dtype": "float32"}, ["dtype", "'float32'"]),
        ({"device": "gpu0"}, ["device", "'gpu0'", "'cpu'"]),
        ({"device": 3.5}, ["device", "3.5"]),
    ],
)
def test_bad_load_options_are_refused_before_loading(no_weights, kwargs: dict, fragments: list[str]) -> None:
    refused(lambda: load_model(DEFAULT_MODEL, **kwargs), *fragments)


def test_load_prints_no_progress_bar(tiny_llama_dir: Path, capfd) -> None:
    from transformers.utils import logging

    before = logging.set_tqdm_hook(None)
    logging.set_tqdm_hook(before)
    capfd.readouterr()
    model, _ = load_model(str(tiny_llama_dir))
    assert model.config.num_hidden_layers == 2
    assert "Loading weights" not in capfd.readouterr().err
    assert logging.set_tqdm_hook(before) is before  # the caller's hook is back


# ------------------------------------------------------------------------------------- text files


def _write(path: Path, content: bytes | None) -> Path:
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


TEXT_FILES = [
    ("binary", bytes(range(256)) * 4, ["not UTF-8", "byte 128"]),
    ("latin-1", "Caf\u00e9 cr\u00e8me, na\u00efve.".encode("latin-1"), ["not UTF-8", "iconv"]),
    ("utf-16", "hello".encode("utf-16"), ["not UTF-8"]),
    ("empty", b"", ["holds no text"]),
    ("whitespace", b" \n\t\r\n  ", ["holds no text"]),
    ("directory", None, ["is a directory"]),
]


@pytest.mark.parametrize(
    ("content", "fragments"), [t[1:] for t in TEXT_FILES], ids=[t[0] for t in TEXT_FILES]
)
@pytest.mark.parametrize("flag", ["--text-file", "text_file", "--prompt-file"])
def test_bad_text_files_name_flag_and_file(tmp_path: Path, content, fragments: list[str], flag: str) -> None:
    path = _write(tmp_path / "text.txt", content)
    message = refused(lambda: read_text_file(flag, path), f"{flag}: {str(path)!r}", *fragments)
    assert "does not exist" not in message
    refused(lambda: load_text(path, flag), flag, str(path), *fragments)


@pytest.mark.parametrize("path", ["missing.txt", "no/such/dir/text.txt"])
def test_missing_text_file(tmp_path: Path, path: str) -> None:
    refused(lambda: load_text(tmp_path / path), "text_file", "does not exist")


@pytest.mark.parametrize("path", [None, 42, ""])
def test_text_file_must_be_a_path(path: object) -> None:
    refused(lambda: load_text(path), "text_file", repr(path))


def test_commands_read_text_file_is_the_same_check(tmp_path: Path) -> None:
    from kvsqueeze.commands.common import read_text_file as cli_read

    path = _write(tmp_path / "latin.txt", "caf\u00e9".encode("latin-1"))
    assert refused(lambda: read_text_file("--text-file", path)) == refused(
        lambda: cli_read("--text-file", path)
    )
    good = _write(tmp_path / "good.txt", b"a\r\nb")
    assert cli_read("--text-file", good) == "a\r\nb" and load_text(good) == "a\nb"
