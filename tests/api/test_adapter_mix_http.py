"""Per-request adapter mixes over HTTP (real uvicorn): native `adapters` and the OpenAI `adapters` extra field.

A 0.7/0.3 mix generates what PEFT's `add_weighted_adapter(combination_type="cat")`
generates, while requests for each member, the base and a MiSS adapter run in the
same batches; a member re-upload changes the mix; refusals are clear 4xx and a
foreign member is the same 404 as a missing one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from server.app import create_app
from tests.adapters.adapter_factory import make_peft
from tests.api.adapter_http import ALICE, BOB, auth, load_tiny, upload, write_keys
from tests.harness import cpu_settings, running_server

PROMPT = "The quick brown fox jumps over the lazy dog and then"
NEW_TOKENS = 12
MIX = [{"id": "a", "weight": 0.7}, {"id": "b", "weight": 0.3}]
SOURCES = {"a": ("lora_qv", 70), "b": ("lora_embed", 71), "m": ("miss_balance", 72), "a2": ("lora_qv", 73)}


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("mix-http")
    base = load_tiny(tiny_model_dir)
    for name, (kind, seed) in SOURCES.items():
        make_peft(base, kind, tmp / name, seed=seed, scale=0.5)
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"),
                            max_adapters_resident=6, max_batch=6, max_rank=20)
    with running_server(create_app(settings)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            for name in ("a", "b", "m"):
                assert upload(client, name, tmp / name).status_code == 201
            assert upload(client, "theirs", tmp / "a2", key=BOB).status_code == 201
        yield url, tmp


def _peft_text(tiny_model_dir: Path, tmp: Path, adapter: str | None, first: str = "a") -> str:
    """PEFT's greedy continuation of PROMPT: `adapter` "mix" is its cat mix of `first` (0.7) and b (0.3)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_tiny(tiny_model_dir).model
    if adapter in ("mix", "a", "b"):
        model = PeftModel.from_pretrained(model, str(tmp / first), adapter_name="a")
        model.load_adapter(str(tmp / "b"), adapter_name="b")
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
        model.set_adapter(adapter)
    elif adapter is not None:
        model = PeftModel.from_pretrained(model, str(tmp / adapter))
    return _greedy_text(model, tokenizer)


def _greedy_text(model, tokenizer) -> str:
    """PEFT's greedy answer to PROMPT, as text (what the server's /generate returns)."""
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _generate(client: httpx.Client, key: str = ALICE, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": NEW_TOKENS, **fields}
    return client.post("/generate", json=body, headers=auth(key))


def test_mix_in_a_mixed_batch_generates_what_peft_cat_generates(served, tiny_model_dir: Path) -> None:
    url, tmp = served
    rows = {"mix": {"adapters": MIX}, "a": {"adapter_id": "a"}, "b": {"adapter_id": "b"}, None: {},
            "m": {"adapter_id": "m"}}
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(len(rows) * 2) as pool:
        futures = {(name, i): pool.submit(_generate, client, **fields)
                   for i in range(2) for name, fields in rows.items()}  # all in flight together: shared batches
        got = {k: f.result() for k, f in futures.items()}
    for (name, _), r in got.items():
        assert r.status_code == 200, r.text
        assert r.json()["text"] == _peft_text(tiny_model_dir, tmp, name), name
    texts = {name: got[(name, 0)].json()["text"] for name in rows}
    assert texts["mix"] not in (texts["a"], texts["b"], texts[None]), "the mix must change the output"
    assert got[("mix", 0)].json()["adapter_id"] is None


def test_reupload_of_a_member_changes_the_mix(served, tiny_model_dir: Path) -> None:
    url, tmp = served
    with httpx.Client(base_url=url, timeout=120) as client:
        before = _generate(client, adapters=MIX)
        assert upload(client, "a", tmp / "a2").status_code == 201
        after = _generate(client, adapters=MIX)
        assert upload(client, "a", tmp / "a").status_code == 201  # back, for the other tests
        again = _generate(client, adapters=MIX)
    assert before.status_code == after.status_code == again.status_code == 200
    assert after.json()["text"] == _peft_text(tiny_model_dir, tmp, "mix", first="a2")
    assert after.json()["text"] != before.json()["text"] and again.json()["text"] == before.json()["text"]


def test_a_foreign_member_is_the_same_404_as_a_missing_one(served) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=120) as client:
        foreign = _generate(client, adapters=[{"id": "a", "weight": 0.5}, {"id": "theirs", "weight": 0.5}])
        missing = _generate(client, adapters=[{"id": "a", "weight": 0.5}, {"id": "nothere", "weight": 0.5}])
        plain = _generate(client, adapter_id="nothere")
    assert foreign.status_code == missing.status_code == plain.status_code == 404
    assert foreign.json()["error"]["message"].replace("theirs", "X") == missing.json()["error"]["message"].replace(
        "nothere", "X") == plain.json()["error"]["message"].replace("nothere", "X")
    assert foreign.json()["error"]["type"] == missing.json()["error"]["type"]


@pytest.mark.parametrize("fields,expected", [
    ({"adapter_id": "a", "adapters": MIX}, "either adapter_id or adapters"),
    ({"adapters": [{"id": "a", "weight": 0.5}, {"id": "a", "weight": 0.5}]}, "'a' is listed twice"),
    ({"adapters": []}, "1 to 8 members"),
    ({"adapters": [{"id": f"x{i}", "weight": 1} for i in range(9)]}, "1 to 8 members"),
    ({"adapters": [{"id": "a", "weight": 0.5, "scale": 2}]}, "scale"),
    ({"adapters": [{"id": "a"}]}, "weight"),
    ({"adapters": [{"id": "a", "weight": "INF"}]}, "finite"),
], ids=["both", "duplicate", "empty", "too-many", "unknown-field", "no-weight", "infinite"])
def test_bad_mixes_are_422(served, fields, expected) -> None:
    url, _ = served
    body = json.dumps({"prompt": PROMPT, **fields}).replace('"INF"', "1e400")  # JSON's overflow to inf
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/generate", content=body, headers={**auth(ALICE), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert expected in r.json()["error"]["message"]


def test_summed_rank_over_max_rank_is_422(served) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=120) as client:
        r = _generate(client, adapters=[{"id": "a", "weight": 0.5}, {"id": "m", "weight": 0.5}])  # 8 + 12 on q/v
        ok = _generate(client, adapters=[{"id": "m", "weight": 1.0}])
        r2 = _generate(client, adapters=MIX + [{"id": "m", "weight": 0.1}])
    assert ok.status_code == 200, ok.text
    assert r.status_code == 200, r.text  # 20 = max_rank
    assert r2.status_code == 422 and "summed rank is 28" in r2.json()["error"]["message"]


def test_openai_routes_take_the_mix_as_an_extra_body_field(served) -> None:
    import openai

    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0, timeout=60)
    base_id = client.models.list().data[0].id
    done = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                     extra_body={"adapters": MIX})
    with httpx.Client(base_url=url, timeout=120) as http:
        native = _generate(http, adapters=MIX).json()["text"]
    assert done.choices[0].text == native and done.model == base_id
    chat = client.chat.completions.create(model=base_id, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, extra_body={"adapters": MIX})
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="model must be the base model's id"):
        client.completions.create(model="a", prompt=PROMPT, max_tokens=2, extra_body={"adapters": MIX})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=base_id, prompt=PROMPT, max_tokens=2,
                                  extra_body={"adapters": [{"id": "theirs", "weight": 1.0}]})
    with pytest.raises(openai.BadRequestError, match="listed twice"):
        client.completions.create(model=base_id, prompt=PROMPT, max_tokens=2,
                                  extra_body={"adapters": [{"id": "a", "weight": 1}, {"id": "a", "weight": 1}]})


def _peft_recipe_text(tiny_model_dir: Path, tmp: Path, **kw) -> str:
    """PEFT's greedy continuation with add_weighted_adapter(a 0.7, b 0.3, **kw), its draws seeded at 5."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(load_tiny(tiny_model_dir).model, str(tmp / "a"), adapter_name="a")
    model.load_adapter(str(tmp / "b"), adapter_name="b")
    inject = model.base_model.inject_adapter
    model.base_model.inject_adapter = lambda *a, **k: (inject(*a, **k), torch.manual_seed(5))
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "merged", **kw)
    model.set_adapter("merged")
    return _greedy_text(model, tokenizer)


@pytest.mark.parametrize("recipe", [{"combination_type": "ties", "density": 0.5},
                                    {"combination_type": "dare_ties", "density": 0.7, "seed": 5}],
                         ids=["ties", "dare_ties"])
def test_a_merge_recipe_stores_what_peft_add_weighted_adapter_builds(served, tiny_model_dir: Path, recipe) -> None:
    url, tmp = served
    new_id = f"made-{recipe['combination_type'].replace('_', '-')}"
    with httpx.Client(base_url=url, timeout=120) as client:
        made = client.post(f"/v1/adapters/{new_id}/mix", json={"adapters": MIX, **recipe}, headers=auth(ALICE))
        assert made.status_code == 201, made.text
        got = _generate(client, adapter_id=new_id)
    record = made.json()
    assert record["id"] == new_id and record["type"] == "lora" and record["rank"] == 8
    assert record["recipe"]["combination_type"] == recipe["combination_type"]
    assert record["recipe"]["members"] == ["a", "b"] and record["recipe"]["weights"] == [0.7, 0.3]
    kw = {"combination_type": recipe["combination_type"], "density": recipe["density"]}
    assert got.status_code == 200 and got.json()["text"] == _peft_recipe_text(tiny_model_dir, tmp, **kw)


@pytest.mark.parametrize("body,status,expected", [
    ({"adapters": MIX, "combination_type": "dare_linear", "density": 0.5}, 422, "seed is required"),
    ({"adapters": MIX, "combination_type": "svd"}, 422, "combination_type"),
    ({"adapters": MIX, "combination_type": "cat", "extra": 1}, 422, "extra"),
    ({"adapters": [{"id": "a", "weight": 1}, {"id": "m", "weight": 1}], "combination_type": "cat"}, 422,
     "'m' is a MISS adapter"),
    ({"adapters": [{"id": "a", "weight": 1}, {"id": "theirs", "weight": 1}], "combination_type": "cat"}, 404,
     "adapter 'theirs' not found"),
], ids=["dare-no-seed", "svd", "unknown-field", "miss-member", "foreign-member"])
def test_bad_recipes_are_refused_and_store_nothing(served, body, status, expected) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/adapters/never/mix", json=body, headers=auth(ALICE))
        after = client.get("/v1/adapters/never", headers=auth(ALICE))
    assert r.status_code == status, r.text
    assert expected in r.json()["error"]["message"]
    assert after.status_code == 404
