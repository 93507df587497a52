"""The config loader fuzzed (issue 17, item 4; the data parsers are tests/unit/test_fuzz_parsers.py): YAML text,
snippets that attack YAML loaders (alias bombs, python tags, huge numbers) and the genuine digits config spliced,
and dotted overrides. Every example loads to a sane config or ends in one ConfigError line, in bounded time and
memory. Examples (derandomized): YAML 900 + overrides 300."""

import os

from hypothesis import given
from hypothesis import strategies as st

from ddpm_dist.config import ConfigError, load_config
from tests.support.common import ROOT
from tests.support.fuzz_helpers import bounded, expect, fuzz

GENUINE_YAML = open(os.path.join(ROOT, "configs", "digits.yaml")).read()
YAML_SNIPPETS = st.sampled_from(
    [
        "a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
        "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nname: *g\n",
        "seed: .inf\n",
        "seed: .nan\n",
        "seed: 1e400\n",
        "name: 2001-13-45\n",
        "[" * 3000,
        "train: {lr: [[[[]]]]}\n",
        "!!python/object:os.system x\n",
        "train:\n  betas: !!set {a, b}\n",
        "? [1]\n: 2\n",
        "name: !!binary AAAA\n",
        'diffusion:\n  schedule: "a\\nb"\n',
        "model: null\n",
        "\xff\xfe",
        "data:\n  source: " + "x" * 100_000 + "\n",
        "seed: 99999999999999999999999999999\n",
        "train:\n  lr: 1e999\n",
        "name: 0o777\n",
        "- 1\n- 2\n",
    ]
)


@given(
    st.one_of(
        st.text(max_size=200),
        YAML_SNIPPETS,
        st.tuples(st.integers(0, len(GENUINE_YAML)), st.integers(0, len(GENUINE_YAML)), st.text(max_size=12)),
    )
)
@fuzz(900)
def test_config_yaml(tmp_path_factory, text):
    if isinstance(text, tuple):  # the genuine digits config, spliced
        a, b, insert = text
        text = GENUINE_YAML[: min(a, b)] + insert + GENUINE_YAML[max(a, b) :]
    path = tmp_path_factory.getbasetemp() / "fuzzed.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if text != "\xff\xfe" else b"\xff\xfe")
    with bounded():
        cfg = expect(lambda: load_config(str(path)), (ConfigError,))
        assert cfg is None or cfg.train.global_batch > 0


@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.sampled_from(
                [
                    "seed=.inf",
                    "train.lr=[",
                    "name=2001-13-45",
                    "a.b.c=1",
                    "train=3",
                    "seed=" + "[" * 3000,
                    "train.betas=[1]",
                    "diffusion.schedule=\u2028",
                    "=",
                    "data.shard_buffer_mb=0",
                ]
            ),
        ),
        max_size=3,
    )
)
@fuzz(300)
def test_config_overrides(overrides):
    with bounded():
        expect(lambda: load_config(None, overrides), (ConfigError,))
