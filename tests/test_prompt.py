"""The prompt: golden text, chat template, token counts, NaN errors, batch == row-by-row."""

import copy
import time

import numpy as np
import pandas as pd
import pytest

from modeling import inference
from modeling.feature_registry import FEATURE_NAMES
from modeling.prompt import CHAT_DATE_STRING, PromptBuilder, PromptDataError, count_tokens, format_value

ROW = {
    "date": pd.Timestamp("2021-03-04"),
    "symbol": "ACME",
    "sector": "Technology",
    "ret_1d": 0.012345,
    "ret_5d": -0.0321,
    "ret_20d": 0.0,
    "ret_60d": 0.25,
    "vol_20d": 0.0154,
    "vol_60d": 0.02,
    "hl_range_20d": 0.031,
    "ma_gap_20d": -0.00456,
    "ma_gap_60d": 0.1,
    "rsi_14d": 55.55,
    "dist_high_60d": -0.12,
    "volume_ratio_5_20d": 1.2345,
    "log_dollar_volume_20d": 18.4567,
    "amihud_20d": 0.0789,
    "max_ret_20d": 0.05,
    "overnight_gap": -0.001,
}

GOLDEN = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a quantitative equity analyst. Regression task: answer with one number only.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Stock ACME (Technology), daily data at the 2021-03-04 close:\n"
    "1d return %=1.23\n"
    "5d return %=-3.21\n"
    "20d return %=0\n"
    "60d return %=25\n"
    "20d vol %=1.54\n"
    "60d vol %=2\n"
    "20d high-low range %=3.1\n"
    "20d SMA gap %=-0.456\n"
    "60d SMA gap %=10\n"
    "14d RSI=55.5\n"
    "60d high gap %=-12\n"
    "5d/20d volume ratio=1.23\n"
    "20d log dollar volume=18.5\n"
    "20d Amihud per $1B=0.0789\n"
    "20d max daily return %=5\n"
    "overnight gap %=-0.1\n"
    "Predict its return minus the average return of the universe over the next trading day.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _frame(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "date": pd.bdate_range("2022-01-03", periods=n),
            "symbol": [f"S{i:03d}" for i in range(n)],
            "sector": rng.choice(["Energy", None], n),
        }
    )
    for name in FEATURE_NAMES:
        frame[name] = rng.normal(0, 0.05, n)
    return frame


def test_golden_prompt(prompt_tokenizer):
    assert PromptBuilder(horizon=1).render(ROW, prompt_tokenizer) == GOLDEN


def test_chat_template_is_applied(prompt_tokenizer):
    builder = PromptBuilder(horizon=5)
    text = builder.render(ROW, prompt_tokenizer)
    messages = builder.messages(ROW)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert text == prompt_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "over the next 5 trading days." in text
    ids = prompt_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == prompt_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(prompt_tokenizer.convert_tokens_to_ids("<|start_header_id|>")) == 3  # one BOS, 3 turns


def test_batch_equals_row_by_row_and_token_counts(prompt_tokenizer):
    builder = PromptBuilder()
    frame = _frame()
    prompts, n_tokens = builder.build(frame, prompt_tokenizer, batch_size=16)  # several batches
    assert len(prompts) == len(frame) == len(n_tokens)
    for i in (0, 17, 49):
        assert prompts[i] == builder.render(frame.iloc[i], prompt_tokenizer)
        assert n_tokens[i] == len(prompt_tokenizer(prompts[i], add_special_tokens=False)["input_ids"])
    no_sector = int(frame.sector.isna().to_numpy().argmax())
    assert f"Stock S{no_sector:03d}, daily data at the" in prompts[no_sector]
    assert "(Energy), daily data" in prompts[int(frame.sector.notna().to_numpy().argmax())]


def test_nan_feature_is_a_clear_error(prompt_tokenizer):
    frame = _frame()
    frame.loc[7, "vol_60d"] = np.nan
    frame.loc[9, "ret_1d"] = np.inf
    with pytest.raises(PromptDataError) as err:
        PromptBuilder().build(frame, prompt_tokenizer)
    message = str(err.value)
    assert "'vol_60d'" in message and "S007" in message and "2022-01-12" in message
    with pytest.raises(PromptDataError, match="'ret_1d' is inf for symbol S009"):
        PromptBuilder().user_contents(frame.drop(index=7))
    # finite, but inf once a return is written in percent: refused, never printed as "inf"
    huge = _frame()
    huge.loc[3, "ret_1d"] = 1e307
    with pytest.raises(PromptDataError, match="'ret_1d' is 1e\\+307 for symbol S003.*out of range"):
        PromptBuilder().user_contents(huge)
    # a percentile prompt prints no value, so a huge one is just the top of its date (rank 25 of 25)
    largest = _cross_section().assign(ret_1d=1e306 * np.arange(50))
    assert "1d return pct=98\n" in PromptBuilder(number_format="percentile").user_contents(largest)[49]


def test_values_never_print_nan_and_use_fixed_significant_digits():
    assert format_value(0.0123456, 3) == "0.0123"
    assert format_value(-1234.5, 3) == "-1.23e+03"
    assert format_value(-0.0, 3) == "0"
    assert format_value(18.4567, 3) == "18.5"
    # tiny, huge and negative-zero values as they reach the prompt (returns are shown in %)
    row = {**ROW, "ret_1d": -1e-9, "ret_60d": -0.0, "amihud_20d": 123456.0}
    content = PromptBuilder().user_contents(pd.DataFrame([row]))[0].splitlines()
    assert "1d return %=-1e-07" in content and "60d return %=0" in content
    assert "20d Amihud per $1B=1.23e+05" in content


def test_numbers_tokenize_digit_by_digit(prompt_tokenizer):
    tokens = prompt_tokenizer.tokenize("5d return %=-3.21")
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == ["5", "3", "2", "1"]


def test_tokenizer_is_lossless_and_counts_match_the_generic_call(prompt_tokenizer, monkeypatch):
    """The embedded tokenizer encodes without the regex split: it must still be lossless, keep digits
    apart, and `count_tokens` (Rust backend) must agree with `tokenizer(...)`."""
    prompts, n_tokens = PromptBuilder().build(_frame(200, seed=3), prompt_tokenizer)
    prompts += [
        PromptBuilder(horizon=20).render(ROW, prompt_tokenizer),
        "  multiple   spaces\n\n and 12,345.6 $ é",
    ]
    generic_ids = prompt_tokenizer(prompts, add_special_tokens=False)["input_ids"]
    generic = [len(ids) for ids in generic_ids]
    assert count_tokens(prompt_tokenizer, prompts, chunk=7).tolist() == generic
    # the scoring path's ids (Rust backend, in chunks that do not divide the rows) are the generic call's
    monkeypatch.setattr(inference, "ENCODE_CHUNK", 7)
    assert inference.encode_prompts(prompt_tokenizer, prompts) == generic_ids
    assert n_tokens.tolist() == generic[:200]
    for text in prompts[-3:]:
        ids = prompt_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prompt_tokenizer.decode(ids) == text
    assert "1" in prompt_tokenizer.tokenize("12,345")[0] and len(prompt_tokenizer.tokenize("12345")) == 5


def test_missing_column_and_bad_config():
    with pytest.raises(KeyError, match="rsi_14d"):
        PromptBuilder().user_contents(_frame().drop(columns="rsi_14d"))
    with pytest.raises(ValueError, match="horizon"):
        PromptBuilder(horizon=0)
    with pytest.raises(ValueError, match="target"):
        PromptBuilder(target="log_return")


def test_task_line_names_the_label_kind():
    assert PromptBuilder(target="raw").task_line == "Predict its return over the next trading day."
    assert PromptBuilder(horizon=5, target="cs_zscore").task_line == (
        "Predict the z-score of its return across the universe over the next 5 trading days."
    )
    assert "%" not in PromptBuilder().task_line  # the label is not in percent


def test_settings_differences_name_each_setting_written_otherwise():
    corpus = PromptBuilder(horizon=5, sig_digits=3)
    pretrained = PromptBuilder(horizon=5, sig_digits=2, number_format="both").settings()
    assert corpus.differences(pretrained) == {"sig_digits": (2, 3), "number_format": ("both", "value")}
    assert corpus.differences(corpus.settings()) == {}
    assert corpus.differences({"horizon": 1, "unrecorded": 0}) == {"horizon": (1, 5)}  # only what both record


LLAMA31_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = 'x' %}{%- endif %}"
    "{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}\n\n"
    "{{ messages[0]['content'] }}<|eot_id|>"
    "{%- for m in messages[1:] %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)


def test_clock_dependent_chat_template_renders_the_same_text_every_day(prompt_tokenizer):
    """Llama 3.1+ templates write today's date unless given `date_string`: the prompt passes a fixed one,
    so a row's text does not depend on the day it is rendered (training vs inference)."""
    tok = copy.deepcopy(prompt_tokenizer)
    tok.chat_template = LLAMA31_STYLE_TEMPLATE
    builder = PromptBuilder()
    today = time.strftime("%d %b %Y")
    unpinned = tok.apply_chat_template(builder.messages(ROW), tokenize=False, add_generation_prompt=True)
    assert f"Today Date: {today}" in unpinned  # what the template does on its own
    text = builder.render(ROW, tok)
    assert f"Today Date: {CHAT_DATE_STRING}\n\n" in text and today not in text.split("close:")[0]
    assert builder.render_batch(pd.DataFrame([ROW]), tok) == [text]


def test_token_counts_ignore_truncation_and_padding_stored_in_the_tokenizer(prompt_tokenizer):
    """A checkpoint's tokenizer.json may switch truncation/padding on; n_tokens is the full length."""
    prompts, _ = PromptBuilder().build(_frame(20, seed=5), prompt_tokenizer)
    expected = count_tokens(prompt_tokenizer, prompts)
    tok = copy.deepcopy(prompt_tokenizer)
    tok.backend_tokenizer.enable_truncation(max_length=16)
    tok.backend_tokenizer.enable_padding(length=400)
    assert (expected > 16).all() and (expected < 400).all()
    assert count_tokens(tok, prompts).tolist() == expected.tolist()
    assert tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is left as it was


def _cross_section(n_names: int = 25, n_dates: int = 2, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        [(d, f"S{i:02d}") for d in pd.bdate_range("2024-01-02", periods=n_dates) for i in range(n_names)],
        columns=["date", "symbol"],
    )
    for name in FEATURE_NAMES:
        frame[name] = rng.normal(0, 0.02, len(frame))
    return frame


def test_percentiles_are_per_date_ranks_by_hand():
    frame = _cross_section()
    frame.loc[frame["date"] == frame["date"].iloc[0], "ret_5d"] = np.arange(25.0)  # ranks 1..25
    frame.loc[3, "ret_1d"] = frame.loc[4, "ret_1d"]  # a tie shares its average rank
    builder = PromptBuilder(number_format="percentile")
    out = builder.with_percentiles(frame)
    # floor(100 (rank - 0.5) / n): the lowest of 25 names is 2, the highest 98
    assert out["ret_5d_pct"].iloc[:25].tolist() == [int(np.floor(100 * (r - 0.5) / 25)) for r in range(1, 26)]
    day1 = frame.iloc[:25]
    tied_rank = day1["ret_1d"].rank(method="average").iloc[3]
    assert (
        out["ret_1d_pct"].iloc[3] == out["ret_1d_pct"].iloc[4] == int(np.floor(100 * (tied_rank - 0.5) / 25))
    )
    # the other date is ranked within itself only
    day2 = frame.iloc[25:]
    expected = np.floor(100 * (day2["vol_20d"].rank() - 0.5) / 25).astype(int).tolist()
    assert out["vol_20d_pct"].iloc[25:].tolist() == expected
    assert out[[f"{n}_pct" for n in FEATURE_NAMES]].to_numpy().min() >= 0
    assert out[[f"{n}_pct" for n in FEATURE_NAMES]].to_numpy().max() <= 99
    assert PromptBuilder().with_percentiles(frame) is frame  # values need none


def test_percentile_and_both_formats_render_and_round_trip(prompt_tokenizer):
    frame = _cross_section()
    pct = PromptBuilder(number_format="percentile")
    first = pct.user_contents(frame)[0]
    expected_5d = int(pct.with_percentiles(frame)["ret_5d_pct"].iloc[0])
    assert f"5d return pct={expected_5d}\n" in first and "%" not in first.split("\n", 1)[1]
    both = PromptBuilder(number_format="both").user_contents(frame)[0]
    value = format_value(frame["ret_5d"].iloc[0] * 100, 3)
    assert f"5d return %={value} pct {expected_5d}\n" in both
    # the same rows rendered in two batches (split inside a date) give the same text: percentiles come
    # from whole dates, computed once before batching
    flat = [p for batch, _ in pct.iter_batches(frame, prompt_tokenizer, batch_size=7) for p in batch]
    assert flat == pct.render_batch(frame, prompt_tokenizer)
    assert PromptBuilder.from_settings(pct.settings()).number_format == "percentile"
    old = {k: v for k, v in PromptBuilder().settings().items() if k != "number_format"}
    assert PromptBuilder.from_settings(old).number_format == "value"  # models saved before the option


def test_percentiles_refuse_a_thin_cross_section():
    with pytest.raises(PromptDataError, match="whole universe"):
        PromptBuilder(number_format="percentile").user_contents(_cross_section(n_names=7))
    with pytest.raises(ValueError, match="number_format"):
        PromptBuilder(number_format="decile")


def test_percentiles_refuse_a_resampled_cross_section():
    """Rows drawn with replacement (bucket mode 'resample') are not a date's cross-section: a repeated
    row would take several ranks, and the prompts would show percentiles no live row ever has."""
    frame = _cross_section()
    drawn = pd.concat([frame, frame.iloc[[3, 3, 40]]], ignore_index=True)
    with pytest.raises(PromptDataError, match="3 rows repeat a \\(date, symbol\\).*'weight'"):
        PromptBuilder(number_format="percentile").with_percentiles(drawn)
    assert PromptBuilder().with_percentiles(drawn) is drawn  # values need no cross-section


def test_a_model_refuses_features_defined_otherwise(monkeypatch) -> None:
    """The fingerprint covers what gives a feature its value and its prompt text (name, SQL, label, unit,
    scale), not its prose; settings saved before one feature's SQL changed no longer load."""
    from dataclasses import replace

    from modeling import feature_registry
    from modeling.errors import ModelUnloadableError
    from modeling.feature_registry import FEATURES, registry_fingerprint

    saved = PromptBuilder().settings()
    assert saved["feature_registry_sha"] == registry_fingerprint() == registry_fingerprint(FEATURES)
    assert PromptBuilder.from_settings(saved).horizon == 1
    changed = {
        "sql": replace(FEATURES[1], sql="close / lag(close, 6) OVER w_sym - 1"),
        "label": replace(FEATURES[1], label="6d return"),
        "unit": replace(FEATURES[1], unit="bp"),
        "scale": replace(FEATURES[1], prompt_scale=10_000.0),
    }
    prose = replace(FEATURES[1], meaning="Something else.", formula="x")
    assert registry_fingerprint((FEATURES[0], prose, *FEATURES[2:])) == saved["feature_registry_sha"]
    for what, spec in changed.items():
        other = (FEATURES[0], spec, *FEATURES[2:])
        assert registry_fingerprint(other) != saved["feature_registry_sha"], what
    monkeypatch.setattr(feature_registry, "FEATURES", (FEATURES[0], changed["sql"], *FEATURES[2:]))
    with pytest.raises(ModelUnloadableError, match="trained on features defined otherwise"):
        PromptBuilder.from_settings(saved)
    legacy = {k: v for k, v in saved.items() if k != "feature_registry_sha"}  # saved before the fingerprint
    assert PromptBuilder.from_settings(legacy).number_format == "value"


LEGEND_GOLDEN = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a quantitative equity analyst. Regression task: answer with one number only. "
    "Predict its return minus the average return of the universe over the next trading day. "
    "Each stock-day gives its features as code=value: a 1d return %, b 5d return %, c 20d return %, "
    "d 60d return %, e 20d vol %, f 60d vol %, g 20d high-low range %, h 20d SMA gap %, i 60d SMA gap %, "
    "j 14d RSI, k 60d high gap %, l 5d/20d volume ratio, m 20d log dollar volume, n 20d Amihud per $1B, "
    "o 20d max daily return %, p overnight gap %.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Stock ACME (Technology), 2021-03-04 close: a=1.23 b=-3.21 c=0 d=25 e=1.54 f=2 g=3.1 h=-0.456 i=10 "
    "j=55.5 k=-12 l=1.23 m=18.5 n=0.0789 o=5 p=-0.1<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_legend_layout_golden_prompt_and_a_shared_system_turn(prompt_tokenizer):
    legend = PromptBuilder(horizon=1, layout="legend")
    assert legend.render(ROW, prompt_tokenizer) == LEGEND_GOLDEN
    # the same numbers as the inline prompt, in the same order, and the definitions once, up front
    inline_values = [
        line.split("=")[1] for line in GOLDEN.split("close:\n")[1].split("\nPredict")[0].split("\n")
    ]
    legend_values = [
        pair.split("=")[1] for pair in LEGEND_GOLDEN.split("close: ")[1].split("<|eot_id|>")[0].split()
    ]
    assert legend_values == inline_values
    # every row's text up to its symbol is the same: what the shared-prefix forward computes once
    prompts = legend.render_batch(_frame(20), prompt_tokenizer)
    head = prompts[0].split("Stock ")[0] + "Stock "
    assert all(p.startswith(head) for p in prompts) and len(head) > 0.6 * len(prompts[0])
    assert PromptBuilder.from_settings(legend.settings()).layout == "legend"
    old = {k: v for k, v in PromptBuilder().settings().items() if k != "layout"}
    assert PromptBuilder.from_settings(old).layout == "inline"  # models saved before the option
    assert PromptBuilder.of_corpus({"horizon": 1, "label_kind": "excess", "layout": "legend"}) == legend
    assert PromptBuilder().differences(legend.settings()) == {"layout": ("legend", "inline")}
    pct = PromptBuilder(layout="legend", number_format="percentile")
    assert "a 1d return % (percentile 0-99)," in pct.system_message
    with pytest.raises(ValueError, match="layout"):
        PromptBuilder(layout="table")
