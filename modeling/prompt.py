"""The prompt: one stock-day as a zero-shot, regression-only chat for the LLM.

One `PromptBuilder` serves training and inference, so the same row always gives the same text:

    system: the analyst role and the regression task
    user:   context (symbol, sector, date), then one line per registry feature with its short
            definition, unit and value (3 significant digits), then the task for horizon h

The messages are rendered with the tokenizer's own chat template
(`apply_chat_template(..., add_generation_prompt=True)`), so a Llama 3 checkpoint sees its native
format. Everything is compact on purpose: tokens cost training time linearly, and the feature
definitions are the registry's short labels rather than full sentences.

Batches are rendered column-wise (one formatting pass per feature, not per cell), and the chat template
is rendered once per batch around a placeholder and verified against a direct
`apply_chat_template` call on the first row of every batch, so a content-dependent template can
never silently diverge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from modeling.data.synthetic import SECTORS
from modeling.errors import ModelUnloadableError
from modeling.feature_registry import FEATURES, PERCENTILE_SUFFIX, FeatureSpec, registry_fingerprint

_PLACEHOLDER = "\u0000user-content\u0000"

TARGET_PHRASES = {
    "raw": "its return",
    "excess": "its return minus the average return of the universe",
    "cs_zscore": "the z-score of its return across the universe",
}
"""What the task line asks for, per label kind of the training set (`modeling.data.training_set`).
No unit: the regression target is the label as stored (scaled to unit train std by default)."""

CHAT_DATE_STRING = "26 Jul 2024"
"""Passed to every chat template as `date_string`. Llama 3.1+ templates write "Today Date: ..." into the
system turn from the clock (`strftime_now`) unless given one, which would make the text of a row
depend on the day it is rendered; this fixed value (Meta's own fallback) keeps it reproducible."""


PROMPT_TEMPLATE_VERSION = 3
"""Version of the prompt text (system message, header, feature lines, task line). Bumped whenever the
text a row renders to changes, so a saved model can refuse prompts it was not trained on."""

NUMBER_FORMATS = ("value", "percentile", "both")
"""How a feature's number is written (`PromptBuilder.number_format`)."""
DEFAULT_NUMBER_FORMAT = "value"
"""The default of the prompt corpus and of the embedded backbone's pretraining prompts (BENCHMARKS.md
compares the formats)."""
LAYOUTS = ("inline", "legend")
"""Where a feature's definition is written (`PromptBuilder.layout`)."""
DEFAULT_LAYOUT = "inline"
"""The default of the prompt corpus and of the embedded backbone's pretraining prompts."""
MIN_PERCENTILE_NAMES = 20
"""A percentile is a rank among the stocks of a date: fewer names than this make it meaningless."""


def cross_section_percentiles(frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    """(rows, features): each feature's rank among the rows of the same date, floor(100 (rank - 0.5) / n)
    clipped to 0..99, with n the date's values of that feature and ties sharing their average rank; NaN
    where the value is NaN (and it does not count in n). The one definition of a prompt percentile
    (`PromptBuilder.with_percentiles`, and the training set, which ranks each date's whole universe
    before unlabelled rows leave it)."""
    by_date = frame.groupby("date")[names]
    counts = by_date.transform("count").to_numpy(dtype=float)  # per feature: a NaN value ranks nothing
    ranks = by_date.rank(method="average").to_numpy(dtype=float)
    return np.floor(100.0 * (ranks - 0.5) / counts).clip(0, 99)


class PromptDataError(ValueError):
    """A feature value cannot be written into a prompt (NaN or infinite)."""


def format_value(value: float, sig_digits: int) -> str:
    """Fixed significant digits, no trailing zeros, '-0' normalised to '0'."""
    text = f"{value:.{sig_digits}g}"
    return "0" if text in ("-0", "0") else text


@dataclass(frozen=True)
class PromptBuilder:
    horizon: int = 1
    """Label horizon in trading days, stated in the task."""
    sig_digits: int = 3
    """Significant digits of every feature value."""
    features: tuple[FeatureSpec, ...] = FEATURES
    """The registry entries, in prompt order."""
    target: str = "excess"
    """Label kind of the training set (raw, excess, cs_zscore): what the task line asks for."""
    number_format: str = DEFAULT_NUMBER_FORMAT
    """value: each feature as its value (`sig_digits` significant digits, in its unit); percentile: its
    rank among the stocks of the same date, 0-99 (two digit tokens instead of about six, no sign, no
    decimals, blind to outliers; needs each date's whole cross-section, see `with_percentiles`); both:
    the value, then the percentile."""
    layout: str = DEFAULT_LAYOUT
    """inline: one line per feature, its definition next to its number ("5d return %=1.79"); legend: the
    definitions once in the system turn, each with a letter code, and the task there too, so the user turn
    holds only the stock, the date and "b=1.79"-style pairs. A legend prompt's leading system turn is the
    same text in every row, which the shared-prefix forward (`modeling.shared_prefix`) computes once per
    batch instead of once per row."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.number_format not in NUMBER_FORMATS:
            raise ValueError(f"number_format must be one of {NUMBER_FORMATS}, got {self.number_format!r}")
        if self.target not in TARGET_PHRASES:
            raise ValueError(f"target must be one of {sorted(TARGET_PHRASES)}, got {self.target!r}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 1 <= self.sig_digits <= 8:
            raise ValueError(f"sig_digits must be in [1, 8], got {self.sig_digits}")

    # --- settings --------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What a saved model records to render the same text at inference (features are the registry)."""
        return {
            "horizon": self.horizon,
            "sig_digits": self.sig_digits,
            "target": self.target,
            "number_format": self.number_format,
            "layout": self.layout,
            "template_version": PROMPT_TEMPLATE_VERSION,
            "feature_registry_sha": registry_fingerprint(self.features),
        }

    @classmethod
    def from_settings(cls, settings: Mapping) -> PromptBuilder:
        version = settings.get("template_version", PROMPT_TEMPLATE_VERSION)
        if version != PROMPT_TEMPLATE_VERSION:
            raise ModelUnloadableError(
                f"the model was trained on prompt template v{version}; this code renders "
                f"v{PROMPT_TEMPLATE_VERSION}, so its prompts would differ"
            )
        trained_on, defined = settings.get("feature_registry_sha"), registry_fingerprint()
        if trained_on is not None and trained_on != defined:
            raise ModelUnloadableError(
                f"the model was trained on features defined otherwise (feature registry {trained_on}; this "
                f"code defines {defined}): a feature's SQL, label, unit or scale changed, so the rows it "
                "would score mean something else; retrain it on features of this definition"
            )
        return cls(
            horizon=int(settings["horizon"]),
            sig_digits=int(settings["sig_digits"]),
            target=str(settings["target"]),
            # models saved before the option existed wrote values
            number_format=str(settings.get("number_format", "value")),
            layout=str(settings.get("layout", "inline")),
        )

    @classmethod
    def of_corpus(cls, facts: Mapping) -> PromptBuilder:
        """The builder a prompt corpus was written with, from its Parquet metadata."""
        return cls(
            horizon=int(facts["horizon"]),
            sig_digits=int(facts.get("sig_digits", 3)),
            target=str(facts["label_kind"]),
            number_format=str(facts.get("number_format", "value")),
            layout=str(facts.get("layout", "inline")),
        )

    def differences(self, other: Mapping) -> dict[str, tuple]:
        """The settings in which `other` (another builder's `settings()`, e.g. the prompts a backbone was
        pretrained on) differs from this builder's: {name: (other's, this one's)}. Settings `other` does
        not record are not compared."""
        mine = self.settings()
        return {k: (other[k], v) for k, v in mine.items() if k in other and other[k] != v}

    # --- text ------------------------------------------------------------------------------------------
    @property
    def system_message(self) -> str:
        role = "You are a quantitative equity analyst. Regression task: answer with one number only."
        if self.layout == "inline":
            return role
        return f"{role} {self.task_line} Each stock-day gives its features as code=value: {self.legend}."

    @property
    def codes(self) -> list[str]:
        """The legend's feature codes: a, b, c, ... (f1, f2, ... past 26 features)."""
        n = len(self.features)
        return list("abcdefghijklmnopqrstuvwxyz"[:n]) if n <= 26 else [f"f{j + 1}" for j in range(n)]

    @property
    def legend(self) -> str:
        """Each feature's code and definition, in prompt order (the legend layout's data definition)."""
        what = {"value": "", "percentile": " (percentile 0-99)", "both": " (value pct percentile 0-99)"}
        return ", ".join(
            f"{code} {f.label}{' ' + f.unit if f.unit else ''}{what[self.number_format]}"
            for code, f in zip(self.codes, self.features, strict=True)
        )

    @property
    def task_line(self) -> str:
        days = "next trading day" if self.horizon == 1 else f"next {self.horizon} trading days"
        return f"Predict {TARGET_PHRASES[self.target]} over the {days}."

    def _line_prefixes(self) -> list[str]:
        if self.layout == "legend":
            return [f"{code}=" for code in self.codes]
        if self.number_format == "percentile":
            return [f"{f.label} pct=" for f in self.features]
        return [f"{f.label}{' ' + f.unit if f.unit else ''}=" for f in self.features]

    def with_percentiles(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` with a `<feature>_pct` column per feature: its rank among the rows of the same date
        (`cross_section_percentiles`). Uses only the date's own cross-section (no other date): call it on
        whole dates, before any sampling or batching. A frame that has the columns already is returned as
        is (the training set stores them, ranked on each date's whole universe, so a name without a label
        still counts; a missing one there is a missing feature value, refused as such, or a date of too
        few names); value-format builders need none."""
        names = [f.name for f in self.features]
        if self.number_format == "value":
            return frame
        self._raise_on_non_finite(frame, frame[names].to_numpy(dtype=float), names)
        if all(n + PERCENTILE_SUFFIX in frame for n in names):
            self._raise_on_thin_dates(frame, frame[[n + PERCENTILE_SUFFIX for n in names]].isna().any(axis=1))
            return frame
        counts = frame.groupby("date")["date"].transform("size")
        self._raise_on_thin_dates(frame, counts < MIN_PERCENTILE_NAMES, counts)
        repeated = int(frame.duplicated(["date", "symbol"]).sum()) if "symbol" in frame else 0
        if repeated:
            raise PromptDataError(
                f"number_format {self.number_format!r} ranks each feature within a date's cross-section, and "
                f"{repeated} rows repeat a (date, symbol): a training set resampled with replacement (bucket "
                "mode 'resample') is not a cross-section. Use bucket mode 'weight' or number_format 'value'"
            )
        pct = cross_section_percentiles(frame, names)
        return frame.assign(
            **{n + PERCENTILE_SUFFIX: pct[:, j].astype(np.int64) for j, n in enumerate(names)}
        )

    def _raise_on_thin_dates(
        self, frame: pd.DataFrame, thin: pd.Series, counts: pd.Series | None = None
    ) -> None:
        """A percentile is meaningless among fewer than `MIN_PERCENTILE_NAMES` names: name the first date."""
        if not len(frame) or not bool(thin.any()):
            return
        first = thin[thin].index[0]
        day = pd.Timestamp(frame.loc[first, "date"]).strftime("%Y-%m-%d")
        has = f"has {int(counts[first])} rows" if counts is not None else "has too few names in its universe"
        raise PromptDataError(
            f"number_format {self.number_format!r} writes each feature as its rank among the stocks of "
            f"a date, and {day} {has}: pass each date's whole universe (at least {MIN_PERCENTILE_NAMES} "
            "names)"
        )

    def user_contents(self, frame: pd.DataFrame) -> list[str]:
        """The user message of every row of `frame` (columns date, symbol, optional sector, features)."""
        names = [f.name for f in self.features]
        missing = [c for c in ("date", "symbol", *names) if c not in frame.columns]
        if missing:
            raise KeyError(f"prompt rows lack column(s) {missing}")
        values = frame[names].to_numpy(dtype=float)
        self._raise_on_non_finite(frame, values, names)
        n = len(frame)
        dates = pd.to_datetime(frame["date"]).dt.strftime("%Y-%m-%d").tolist()
        symbols = frame["symbol"].astype(str).tolist()
        if "sector" in frame.columns:
            sectors = [f" ({s})" if isinstance(s, str) and s else "" for s in frame["sector"].tolist()]
        else:
            sectors = [""] * n
        at = "daily data at the " if self.layout == "inline" else ""
        headers = [
            f"Stock {sym}{sec}, {at}{d} close:" for sym, sec, d in zip(symbols, sectors, dates, strict=True)
        ]
        with np.errstate(over="ignore"):
            scaled = values * np.array([f.prompt_scale for f in self.features])
        # a finite value beyond float range once in its prompt unit (percentile prompts print no value)
        if self.number_format != "percentile" and not np.isfinite(scaled).all():
            row, col = map(int, np.argwhere(~np.isfinite(scaled))[0])
            raise PromptDataError(
                f"feature '{names[col]}' is {values[row, col]:g} for symbol {symbols[row]} on {dates[row]}: "
                "out of range once scaled to its prompt unit; prompts never contain NaN/inf"
            )
        digits = self.sig_digits
        if self.number_format == "value":
            columns = [
                [prefix + format_value(v, digits) for v in scaled[:, j].tolist()]
                for j, prefix in enumerate(self._line_prefixes())
            ]
        else:
            pct = self.with_percentiles(frame)[[n + PERCENTILE_SUFFIX for n in names]].to_numpy(np.int64)
            if self.number_format == "percentile":
                columns = [
                    [prefix + str(p) for p in pct[:, j].tolist()]
                    for j, prefix in enumerate(self._line_prefixes())
                ]
            else:
                columns = [
                    [
                        f"{prefix}{format_value(v, digits)} pct {p}"
                        for v, p in zip(scaled[:, j].tolist(), pct[:, j].tolist(), strict=True)
                    ]
                    for j, prefix in enumerate(self._line_prefixes())
                ]
        if self.layout == "legend":  # the task and the definitions are in the system turn
            return [" ".join((header, *pairs)) for header, *pairs in zip(headers, *columns, strict=True)]
        task = self.task_line
        return ["\n".join((header, *lines, task)) for header, *lines in zip(headers, *columns, strict=True)]

    def _raise_on_non_finite(self, frame: pd.DataFrame, values: np.ndarray, names: list[str]) -> None:
        bad = ~np.isfinite(values)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            date = pd.Timestamp(frame["date"].iloc[row]).strftime("%Y-%m-%d")
            raise PromptDataError(
                f"feature '{names[col]}' is {values[row, col]} for symbol {frame['symbol'].iloc[row]} on "
                f"{date} ({int(bad.sum())} non-finite value(s) in this batch); prompts never contain NaN/inf"
            )

    def messages(self, row: Mapping | pd.Series) -> list[dict[str, str]]:
        """The chat messages of one row."""
        frame = pd.DataFrame([dict(row)])
        return self._messages(self.user_contents(frame)[0])

    def _messages(self, user_content: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_message}, {"role": "user", "content": user_content}]

    # --- chat template ---------------------------------------------------------------------------------
    def render(self, row: Mapping | pd.Series, tokenizer) -> str:
        """One row, rendered by the tokenizer's chat template (the reference path)."""
        return apply_chat(tokenizer, self.messages(row))

    def _template_parts(self, tokenizer) -> tuple[str, str]:
        rendered = apply_chat(tokenizer, self._messages(_PLACEHOLDER))
        if rendered.count(_PLACEHOLDER) != 1:
            raise ValueError("the chat template does not place the user content exactly once")
        prefix, suffix = rendered.split(_PLACEHOLDER)
        return prefix, suffix

    def render_batch(self, frame: pd.DataFrame, tokenizer) -> list[str]:
        """Every row of `frame`, rendered; identical to `render` row by row (checked on the first row)."""
        contents = self.user_contents(frame)
        if not contents:
            return []
        prefix, suffix = self._template_parts(tokenizer)
        prompts = [prefix + c + suffix for c in contents]
        reference = apply_chat(tokenizer, self._messages(contents[0]))
        if prompts[0] != reference:
            raise RuntimeError("the chat template depends on the message content; render rows one by one")
        return prompts

    def iter_batches(
        self, frame: pd.DataFrame, tokenizer, batch_size: int = 8192
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(prompts, token counts) per batch of rows, so a large corpus streams to disk."""
        count = token_counter(tokenizer)  # prepared once per corpus, not per batch
        frame = self.with_percentiles(frame)  # whole dates, before the batches cut them
        for start in range(0, len(frame), batch_size):
            prompts = self.render_batch(frame.iloc[start : start + batch_size], tokenizer)
            yield prompts, count(prompts)

    def build(self, frame: pd.DataFrame, tokenizer, batch_size: int = 8192) -> tuple[list[str], np.ndarray]:
        """All prompts and their token counts."""
        prompts: list[str] = []
        counts: list[np.ndarray] = [np.zeros(0, dtype=np.int32)]
        for batch, n_tokens in self.iter_batches(frame, tokenizer, batch_size):
            prompts.extend(batch)
            counts.append(n_tokens)
        return prompts, np.concatenate(counts)


def apply_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat template's text for `messages`, ending with the assistant header (generation prompt)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, date_string=CHAT_DATE_STRING
    )


def count_tokens(tokenizer, texts: list[str], chunk: int = 1024) -> np.ndarray:
    """Token counts of rendered prompts (the template already wrote BOS: no special tokens added)."""
    return token_counter(tokenizer, chunk)(texts)


def token_counter(tokenizer, chunk: int = 1024) -> Callable[[list[str]], np.ndarray]:
    """A function giving the token counts of rendered prompts, prepared once for many batches.

    A fast tokenizer counts through its Rust backend (`encode_batch_fast`, parallel, no offsets and no
    Python id lists), in chunks of about a thousand texts, which keeps its working set in cache; this
    is about 1.6x faster than `tokenizer(texts)`, with the same counts (tested). Other tokenizers take
    the generic call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        # a checkpoint may ship tokenizer.json with truncation or padding switched on; the count is the
        # full length of the prompt, so count with a copy that has neither
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()

    def count(texts: list[str]) -> np.ndarray:
        counts = np.empty(len(texts), dtype=np.int32)
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            if backend is not None:
                lengths = [len(e) for e in backend.encode_batch_fast(part, add_special_tokens=False)]
            else:
                lengths = [len(ids) for ids in tokenizer(part, add_special_tokens=False)["input_ids"]]
            counts[start : start + len(part)] = lengths
        return counts

    return count


def tokenizer_training_texts(
    builder: PromptBuilder, n_rows: int = 20_000, seed: int = 0, symbols: Sequence[str] | None = None
) -> list[str]:
    """Prompt-like text for training the embedded tokenizer: random but plausible feature rows.

    Only the text statistics matter (words of the template, digits, signs), not the values.
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    if symbols is None:
        symbols = ["".join(rng.choice(letters, size=int(rng.integers(2, 6)))) for _ in range(500)]
    frame = pd.DataFrame(
        {
            "date": pd.Timestamp("2000-01-03") + pd.to_timedelta(rng.integers(0, 365 * 30, n_rows), unit="D"),
            "symbol": rng.choice(np.asarray(symbols), n_rows),
            "sector": rng.choice([*SECTORS, ""], n_rows),
        }
    )
    for f in builder.features:
        # log-normal magnitudes with random signs cover the range of digits and exponents
        frame[f.name] = (
            rng.choice([-1.0, 1.0], n_rows) * np.exp(rng.normal(-3.0, 2.0, n_rows)) / f.prompt_scale
        )

    if builder.number_format != "value":  # (drawn after the values: value-format texts stay as they were)
        for f in builder.features:
            frame[f.name + PERCENTILE_SUFFIX] = rng.integers(0, 100, n_rows)  # the dates here are random
    # The Llama 3 chat layout (its special tokens are not learnt by BPE; the text around them is).
    system = builder.system_message
    return [
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        for content in builder.user_contents(frame)
    ]
