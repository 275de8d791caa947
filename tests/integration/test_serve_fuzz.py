"""A sample of the fuzz corpus (tests/fuzz_corpus.py) over real HTTP against the running Serve app.

Every malformed upload is answered 4xx with the JSON error its decode outcome calls for, and
the replica that answered is the same process before and after: before issue 15, one corrupt
PNG killed the replica (torchvision segfaulted) and the client got a plain-text 500.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import requests

from tests.fuzz_corpus import build_corpus, run_isolated
from tests.integration.test_serve import AUTH, post, registry, serve_url  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP_MAX_PIXELS = 4_000_000  # serve_url's max_pixels
CRASHED_TORCHVISION = re.compile(r"/(IDAT:adler32|IDAT\.\d+:crc@|IDAT:zlib-header|IDAT:row-filter)")
EXPECTED = {"CorruptImageError": (400, "invalid_image"), "ImageTooLargeError": (413, "image_too_large")}


def replica_pids() -> list[int]:
    """The live replica processes of the app (Ray's state API on this driver's instance)."""
    import ray
    from ray.util.state import list_actors

    replicas = [("class_name", "=", "ServeReplica:imgcls:Classifier"), ("state", "=", "ALIVE")]
    actors = list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                         filters=replicas)
    return sorted(a.pid for a in actors)


def replica_id(url: str) -> str:
    return requests.get(f"{url}/v1/stats", headers=AUTH, timeout=30).json()["replica"]


@pytest.fixture(scope="module")
def sample():
    """Every PNG fault that crashed torchvision and every 15th other variant, those that do not
    decode, each with the outcome decode_image gives it under the app's pixel limit (found in a
    child process)."""
    corpus = [v for v in build_corpus() if v.data]  # an empty body is another error (empty_body)
    candidates = [v for i, v in enumerate(corpus) if CRASHED_TORCHVISION.search(v.name) or i % 15 == 0]
    outcomes = run_isolated(candidates, max_pixels=APP_MAX_PIXELS)
    return [(v, o.outcome) for v, o in zip(candidates, outcomes) if o.outcome in EXPECTED]


def test_malformed_uploads_get_4xx_json_and_the_replica_stays_up(serve_url, digits_root, sample):  # noqa: F811
    digit = sorted((digits_root / "test").glob("3/*.png"))[0].read_bytes()
    assert post(serve_url, files=[("file", ("3.png", digit, "image/png"))]).status_code == 200
    pids, replica = replica_pids(), replica_id(serve_url)
    assert len(pids) == 1
    answers = {}
    for variant, outcome in sample:
        r = post(serve_url, files=[("file", (variant.name.replace("/", "_"), variant.data, "image/png"))])
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        answers[variant.name] = (r.status_code, body)
        assert (r.status_code, body["error"] if isinstance(body, dict) else body) == EXPECTED[outcome], (
            variant.name, outcome, r.status_code, body)
        assert variant.name.replace("/", "_") in body["detail"]  # the message names the file
    crashed_before = sum(bool(CRASHED_TORCHVISION.search(name)) for name in answers)
    assert len(answers) >= 150 and crashed_before >= 90
    assert replica_pids() == pids and replica_id(serve_url) == replica  # no replica restarted
    ok = post(serve_url, files=[("file", ("3.png", digit, "image/png"))])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["top_k"][0]["label"] == "3"
    codes = Counter(f"{code} {body['error']}" for code, body in answers.values())
    print(f"\n{len(answers)} malformed uploads ({crashed_before} of them PNG faults that crashed "
          f"torchvision) -> {dict(codes)}; replica pid {pids[0]} and id {replica} unchanged")
