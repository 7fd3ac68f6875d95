"""Synthetic twin of RecFlow: a hidden cascade, logged in exactly the published raw layout.

A latent world (category_level_one → category_level_two → author → video vectors, Zipf popularity,
item quality, users with long-term interests and a sticky short-term intent) is drawn once; then, day
by day, requests go through a simulated production funnel (multi-channel retrieval → pre-rank → coarse
→ rank → re-rank → exposure) and are logged as RecFlow logs them, so the converter reads this twin
through the same code path as the real files (RECFLOW.md, last section).

All work is vectorised numpy over chunks of requests. Random draws come from generators seeded by
(seed, purpose, day[, draw site]), so a config always yields the same bytes, whatever the chunk size.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import pickle
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from lcron_dist.data import schema
from lcron_dist.metrics import joint_recall

REPORT_PATH = "others/synth_report.json"
"""Calibration report written beside id_cnt.pkl (the converter ignores it)."""

_CHUNK = 2048  # requests simulated at once: bounds memory ([C, P, D] float32 ≈ 50 MB), not the output
_WORLD, _REQUESTS, _FUNNEL, _FEEDBACK, _LAYOUT, _SPREAD = range(6)  # seed purposes
_RANK_KEEP = schema.MAX_POSITIVE_INDEX  # the ranking stage passes 20 items on to re-ranking
_GROUP = {label: schema.LOGGED_PER_REQUEST[label][1] for label in schema.STAGE_LABELS}
_ALL_STAGE_ROWS = _RANK_KEEP + _GROUP["rank_neg"] + _GROUP["coarse_neg"] + _GROUP["prerank_neg"]  # per request
_FEEDBACK_COLUMNS = ("playing_time", "effective_view", "long_view", "like", "follow", "forward", "comment")
_NUM_CAT1 = schema.RECFLOW_ID_COUNTS["category_level_one"]
_NUM_CAT2 = schema.RECFLOW_ID_COUNTS["category_level_two"]
_NUM_UPLOAD_TYPES = schema.RECFLOW_ID_COUNTS["upload_type"]

# Hidden utility = interest + intent + quality + context; every term has std ≈ 1 over random items.
_HIERARCHY_NOISE = (0.7, 0.5, 0.4)  # std of category_two | category_one, author | category_two, video | author
_INTEREST_SHARPNESS = 2.0  # how peaked a user's long-term category preference is
_W_INTENT, _W_QUALITY, _W_CONTEXT = 2.0, 0.5, 0.3  # intent dominates, so the last views matter most
# Production stages see the utility differently; the differences are the selection bias.
_PRERANK_POPULARITY = 0.6  # the cheap pre-ranker leans on popularity and knows neither intent nor context
_RERANK_POPULARITY = -0.8  # re-rank pushes fresh, less popular items: the reverse of pre-rank
_RERANK_BOOSTED_TYPES, _RERANK_BOOST = 5, 1.0  # business boost of a few upload types
_DIVERSITY_PENALTY = 0.4  # per better-placed item of the same category_level_two
# Retrieval channels' shares of the pool; the rest is a uniform long tail.
_CHANNELS = {"interest": 0.35, "intent": 0.2, "recent": 0.15, "popular": 0.15}
_RECENT_VIEWS = 5  # the "recent" channel expands the user's last views (yesterday's feature snapshot)
_GOLDEN = (np.sqrt(5) - 1) / 2  # step of the Weyl sequence that replaces repeated pool videos
_WATCH_OFFSET, _WATCH_NOISE = 4.0, 0.8  # watch fraction = sigmoid(utility - offset + noise): ~60% effective
_INTERACTION_OFFSETS = {"like": 8.0, "comment": 8.5, "forward": 9.0, "follow": 9.5}  # rarer and rarer (~6% .. 2%)
PICKLE_PROTOCOLS = (2, 3, 4, 5)
"""Pickle protocols the twin can be written with (numpy arrays pickle the same way in 2..4)."""
VOCABS = ("twin", "recflow")
"""SynthConfig.vocab: the hidden world's own id ranges, or RecFlow's full ones."""
_RECFLOW_COUNTS = {**schema.RECFLOW_ID_COUNTS, "device_id": schema.RECFLOW_NUM_DEVICES}


@dataclass
class SynthConfig:
    """Scale, hidden-cascade and file-layout knobs of the synthetic twin."""

    days: int = 3
    """Number of consecutive days generated, the last one being end_day."""
    requests_per_day: int = 200
    """Requests logged per day."""
    end_day: dt.date = schema.PERIOD1_LAST_DAY
    """Last generated day (RecFlow's Period 1 test day by default); YYYY-MM-DD text is accepted."""
    seed: int = 0
    """Seed of every random draw: the same config writes byte-identical files."""
    num_users: int = 60
    """Users (user_id vocabulary)."""
    num_devices: int = 70
    """Devices (device_id vocabulary); each user logs from one device."""
    num_videos: int = 20_000
    """Videos (video_id vocabulary)."""
    num_authors: int = 2_000
    """Authors (author_id vocabulary)."""
    pool_size: int = 400
    """Distinct videos retrieved per request: the funnel's input."""
    prerank_keep: int = 200
    """Videos the pre-ranking stage passes on to coarse ranking."""
    coarse_keep: int = 80
    """Videos the coarse stage passes on to ranking, which keeps MAX_POSITIVE_INDEX of them."""
    latent_dim: int = 16
    """Dimension of the hidden user and item vectors."""
    zipf_exponent: float = 1.0
    """Exponent of the Zipf law of video popularity."""
    intent_stickiness: float = 0.8
    """Probability that a user's short-term intent carries over to their next request."""
    stage_noise: tuple[float, float, float, float] = (0.9, 0.6, 0.3, 0.2)
    """Noise std of the pre-rank, coarse, rank and re-rank scores (the utility's std is about 1)."""
    shuffle_rows: bool = False
    """Write all_stage (and so realshow) rows in a random order instead of grouped by request: RecFlow
    promises no row order, and the converter must not rely on one."""
    pickle_protocol: int = 5
    """Pickle protocol of the day dicts and id_cnt.pkl (2..5); RecFlow promises none, and protocols <= 4
    store arrays differently from 5."""
    vocab: str = "twin"
    """Id ranges written: twin (each vocabulary the size of the hidden world: num_users, num_videos, ...)
    or recflow (RecFlow's full vocabularies: the hidden users, devices, videos and authors get ids
    spread over RecFlow's whole ranges by an injective map, so popularity keeps its skew and no array
    has a vocabulary's size)."""

    def __post_init__(self) -> None:
        if isinstance(self.end_day, str):
            self.end_day = schema.parse_day(self.end_day)
        self.stage_noise = tuple(float(x) for x in self.stage_noise)
        for name in ("days", "requests_per_day", "num_users", "num_devices", "num_authors", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        funnel = [
            ("pool_size", self.pool_size, "prerank_keep", self.prerank_keep, _GROUP["prerank_neg"]),
            ("prerank_keep", self.prerank_keep, "coarse_keep", self.coarse_keep, _GROUP["coarse_neg"]),
            ("coarse_keep", self.coarse_keep, "MAX_POSITIVE_INDEX", _RANK_KEEP, _GROUP["rank_neg"]),
        ]
        for name, size, kept_name, kept, negatives in funnel:
            if size < kept + negatives:
                raise ValueError(f"SynthConfig.{name}={size} must be >= {kept_name} ({kept}) + {negatives}, so "
                                 f"that the stage drops enough items to sample {negatives} negatives")
        if self.num_videos < 10 * self.pool_size:
            raise ValueError(f"SynthConfig.num_videos={self.num_videos} must be >= 10 * pool_size "
                             f"({10 * self.pool_size}) so that each request's pool is distinct videos")
        if not 0.0 <= self.intent_stickiness <= 1.0:
            raise ValueError(f"SynthConfig.intent_stickiness must be in [0, 1], got {self.intent_stickiness}")
        if self.zipf_exponent <= 0:
            raise ValueError(f"SynthConfig.zipf_exponent must be > 0, got {self.zipf_exponent}")
        if len(self.stage_noise) != 4 or min(self.stage_noise) < 0:
            raise ValueError(f"SynthConfig.stage_noise must be 4 values >= 0, got {self.stage_noise}")
        if self.vocab not in VOCABS:
            raise ValueError(f"SynthConfig.vocab must be one of {VOCABS}, got {self.vocab!r}")
        if self.vocab == "recflow":
            for name, field in (("num_users", "user_id"), ("num_videos", "video_id"), ("num_authors", "author_id"),
                                ("num_devices", "device_id")):
                if getattr(self, name) > _RECFLOW_COUNTS[field]:
                    raise ValueError(f"SynthConfig.{name}={getattr(self, name)} must be <= RecFlow's {field} "
                                     f"vocabulary ({_RECFLOW_COUNTS[field]}) with vocab='recflow'")
        if self.pickle_protocol not in PICKLE_PROTOCOLS:
            raise ValueError(f"SynthConfig.pickle_protocol must be one of {PICKLE_PROTOCOLS}, got {self.pickle_protocol}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        """A named size ('tiny', 'small', 'medium') with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown synth preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def day_list(self) -> list[dt.date]:
        """The generated days, in chronological order."""
        return [self.end_day - dt.timedelta(days=self.days - 1 - i) for i in range(self.days)]


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(days=3, requests_per_day=200, num_users=60, num_devices=70, num_videos=20_000, num_authors=2_000),
    "small": dict(days=8, requests_per_day=4_500, num_users=1_500, num_devices=1_800, num_videos=100_000,
                  num_authors=10_000),
    "medium": dict(days=20, requests_per_day=20_000, num_users=10_000, num_devices=12_000, num_videos=1_000_000,
                   num_authors=100_000),
}
"""Sizes of SynthConfig.preset: tiny for unit tests, small for the demo, medium for benchmarks."""


@dataclass
class SynthReport:
    """What generate() wrote, how fast, and how hard its hidden cascade is."""

    config: SynthConfig
    """The config that generated the twin."""
    out_root: Path
    """The raw root written."""
    requests: int
    """Requests over all days."""
    all_stage_rows: int
    """Rows of all_stage over all days."""
    realshow_rows: int
    """Rows of realshow over all days."""
    effective_view_rate: float
    """Share of realshow rows with effective_view == 1."""
    joint_recall: dict[str, dict[str, float]]
    """Last day's joint recall {'2-stage' | '3-stage': {'random': r, 'noise_free': r}} (METHOD.md §7)."""
    seconds: float
    """Wall time of generate()."""

    @property
    def requests_per_s(self) -> float:
        """Generation throughput."""
        return self.requests / max(self.seconds, 1e-9)

    def to_json(self) -> dict[str, Any]:
        """The deterministic part of the report (no timing), as written to others/synth_report.json."""
        config = dataclasses.asdict(self.config) | {"end_day": self.config.end_day.isoformat()}
        counts = {k: getattr(self, k) for k in ("requests", "all_stage_rows", "realshow_rows", "effective_view_rate")}
        return {"config": config, "days": [d.isoformat() for d in self.config.day_list], **counts,
                "joint_recall": self.joint_recall}

    def summary(self) -> str:
        """A short human-readable table: sizes, throughput and the calibration numbers."""
        days = self.config.day_list
        lines = [
            f"synthetic RecFlow twin -> {self.out_root}",
            f"  {len(days)} day(s) {days[0]} .. {days[-1]}: {self.requests:,} requests, {self.all_stage_rows:,} "
            f"all_stage rows, {self.realshow_rows:,} realshow rows ({self.effective_view_rate:.1%} effective views)",
            f"  generated in {self.seconds:.1f} s ({self.requests_per_s:,.0f} requests/s)",
            f"  {'joint recall on ' + str(days[-1]):<36}{'random':>8}{'noise-free':>12}",
        ]
        for stages, quotas in schema.SERVING_QUOTAS.items():
            recall = self.joint_recall[f"{stages}-stage"]
            flow = " -> ".join(map(str, (schema.StageSetting(stages).num_candidates, *quotas)))
            lines.append(f"    {f'{stages}-stage, {flow}':<34}{recall['random']:>8.3f}{recall['noise_free']:>12.3f}")
        lines.append("  (noise-free: every stage scores with the production ranking score, without its noise)")
        return "\n".join(lines)


@dataclass
class _World:
    """The hidden truth. Videos (and authors) are indexed internally in (category_level_two, author)
    order, so a category's or an author's videos are one contiguous range; published ids are a random
    permutation of that order."""

    cat1_of_cat2: np.ndarray  # [C2]
    video_author: np.ndarray  # [V] internal author index, sorted
    video_cat2: np.ndarray  # [V] sorted
    video_vec: np.ndarray  # [V, D] float32, unit variance per dimension
    quality: np.ndarray  # [V]
    log_pop: np.ndarray  # [V] standardised log popularity
    pop_cum: np.ndarray  # [V + 1] float64, exclusive prefix sums of popularity
    cat2_bounds: np.ndarray  # [C2 + 1] internal video range of each category_level_two
    author_bounds: np.ndarray  # [A + 1]
    items: dict[str, np.ndarray]  # published item columns by internal video index, each [V] int64
    user_vec: np.ndarray  # [U, D] float32
    users: dict[str, np.ndarray]  # device_id, age, gender, province, each [U] int64
    user_ids: np.ndarray  # [U] int64, the user_id written for each internal user
    user_activity: np.ndarray  # [U] probabilities of issuing a request
    user_cat_cdf: np.ndarray  # [U * C2] float64: user u's category CDF, offset by u (one searchsorted for all)
    context: np.ndarray  # [24, C1] hour × category_level_one taste
    boost: np.ndarray  # [upload types] re-rank business boost


@dataclass
class _UserState:
    """What carries over from one day to the next: intents and the last SEQ_LEN effective views."""

    intent: np.ndarray  # [U] category_level_two
    views: dict[str, np.ndarray]  # video (internal), ts, play, request: each [U, L], left-padded, ts 0 = padding


def _normalise(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _day_start_ms(day: dt.date) -> int:
    return int(dt.datetime.combine(day, dt.time(), tzinfo=ZoneInfo(schema.TIME_ZONE)).timestamp() * 1000)


def _spread(ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Ids in [0, n) mapped injectively over [0, size) (n <= size): i -> (a·i + b) mod size, with a stride a
    coprime to size, so neighbouring ids land far apart and the whole range is used."""
    while math.gcd(stride := int(rng.integers(size // 3, size)), size) != 1:
        pass
    return (ids.astype(np.int64) * stride + int(rng.integers(0, size))) % size


def _build_world(config: SynthConfig) -> _World:
    """Draw the hidden catalogue, users and scoring terms (everything that does not change over days)."""
    rng = np.random.default_rng([config.seed, _WORLD])
    d, noise = config.latent_dim, _HIERARCHY_NOISE
    num_videos, num_authors, num_users = config.num_videos, config.num_authors, config.num_users
    # Every category_level_one gets at least one child so its whole vocabulary is in use.
    extra_children = rng.integers(0, _NUM_CAT1, _NUM_CAT2 - _NUM_CAT1)
    cat1_of_cat2 = rng.permutation(np.concatenate([np.arange(_NUM_CAT1), extra_children]))
    author_cat2 = np.sort(rng.choice(_NUM_CAT2, num_authors, p=_normalise(rng.lognormal(0, 1, _NUM_CAT2))))
    video_author = np.sort(rng.choice(num_authors, num_videos, p=_normalise(rng.lognormal(0, 1, num_authors))))
    video_cat2 = author_cat2[video_author]

    # Each level of the hierarchy is its parent plus a smaller noise, so categories and authors carry signal.
    cat2_vec = rng.standard_normal((_NUM_CAT1, d))[cat1_of_cat2] + noise[0] * rng.standard_normal((_NUM_CAT2, d))
    author_vec = cat2_vec[author_cat2] + noise[1] * rng.standard_normal((num_authors, d))
    video_vec = author_vec[video_author] + noise[2] * rng.standard_normal((num_videos, d))
    video_vec = (video_vec / np.sqrt(1 + sum(s * s for s in noise))).astype(np.float32)
    cat2_vec = (cat2_vec / np.sqrt(1 + noise[0] ** 2)).astype(np.float32)

    quality = rng.standard_normal(num_videos).astype(np.float32)
    # Popular videos tend to be good ones, but popularity is only a proxy of quality.
    pop_rank = np.argsort(np.argsort(-(0.5 * quality + rng.standard_normal(num_videos))))
    popularity = (1.0 + pop_rank) ** -config.zipf_exponent
    log_pop = np.log(popularity)
    type_weights = _normalise(rng.permutation(1.0 / np.arange(1, _NUM_UPLOAD_TYPES + 1) ** 1.2))
    author_type = rng.choice(_NUM_UPLOAD_TYPES, num_authors, p=type_weights)
    upload_type = np.where(rng.random(num_videos) < 0.8, author_type[video_author],
                           rng.choice(_NUM_UPLOAD_TYPES, num_videos, p=type_weights))
    # Every video is uploaded before the first request of the twin.
    upload_age_s = 60 + rng.exponential(30 * 86_400, num_videos).astype(np.int64)
    author_id = rng.permutation(num_authors)
    items = {
        "video_id": rng.permutation(num_videos),
        "author_id": author_id[video_author],
        "category_level_one": cat1_of_cat2[video_cat2],
        "category_level_two": video_cat2,
        "upload_type": upload_type,
        "upload_timestamp": _day_start_ms(config.day_list[0]) // 1000 - upload_age_s,
        "duration": np.clip(rng.lognormal(np.log(25_000), 0.8, num_videos), 3_000, 600_000).astype(np.int64),
    }

    users = {"device_id": rng.integers(0, config.num_devices, num_users)}
    for field in ("age", "gender", "province"):
        users[field] = rng.integers(0, schema.RECFLOW_ID_COUNTS[field], num_users)
    # User interests lean a little towards their demographic groups' tastes.
    user_vec = rng.standard_normal((num_users, d))
    for field in ("age", "gender", "province"):
        user_vec += 0.4 * rng.standard_normal((schema.RECFLOW_ID_COUNTS[field], d))[users[field]]
    user_vec = (user_vec / np.sqrt(1 + 3 * 0.4**2)).astype(np.float32)
    logits = _INTEREST_SHARPNESS * (user_vec @ cat2_vec.T) / np.sqrt(d)  # [U, C2]
    cat2_bounds = np.searchsorted(video_cat2, np.arange(_NUM_CAT2 + 1))
    logits[:, np.diff(cat2_bounds) == 0] = -np.inf  # a category without videos cannot be asked for
    prefs = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(prefs / prefs.sum(axis=1, keepdims=True), axis=1, dtype=np.float64)
    cdf[:, -1] = 1.0
    boost = np.zeros(_NUM_UPLOAD_TYPES, np.float32)
    boost[rng.choice(_NUM_UPLOAD_TYPES, _RERANK_BOOSTED_TYPES, replace=False)] = _RERANK_BOOST
    user_ids = np.arange(num_users)
    if config.vocab == "recflow":
        spread = np.random.default_rng([config.seed, _SPREAD])
        user_ids = _spread(user_ids, _RECFLOW_COUNTS["user_id"], spread)
        users["device_id"] = _spread(users["device_id"], _RECFLOW_COUNTS["device_id"], spread)
        for field in ("video_id", "author_id"):
            items[field] = _spread(items[field], _RECFLOW_COUNTS[field], spread)
    return _World(
        cat1_of_cat2=cat1_of_cat2, video_author=video_author, video_cat2=video_cat2, video_vec=video_vec,
        quality=quality, log_pop=((log_pop - log_pop.mean()) / log_pop.std()).astype(np.float32),
        pop_cum=np.concatenate([[0.0], np.cumsum(popularity)]), cat2_bounds=cat2_bounds,
        author_bounds=np.searchsorted(video_author, np.arange(num_authors + 1)), items=items,
        user_vec=user_vec, users=users, user_ids=user_ids, user_activity=_normalise(rng.lognormal(0, 0.8, num_users)),
        user_cat_cdf=(np.arange(num_users)[:, None] + cdf).ravel(),
        context=rng.standard_normal((24, _NUM_CAT1)).astype(np.float32), boost=boost,
    )


class _Streams:
    """Independent random streams keyed by draw site, each seeded by (seed, purpose, day, site).

    A site always draws [C, ...] blocks in request order, so a chunk reads exactly the numbers that a
    whole-day pass would read for its rows: the output does not depend on the chunk size.
    """

    def __init__(self, *key: int) -> None:
        self._key = key
        self._generators: dict[str, np.random.Generator] = {}

    def _generator(self, site: str) -> np.random.Generator:
        if site not in self._generators:
            self._generators[site] = np.random.default_rng([*self._key, zlib.crc32(site.encode())])
        return self._generators[site]

    def uniform(self, site: str, shape: tuple[int, ...]) -> np.ndarray:
        return self._generator(site).random(shape)

    def normal(self, site: str, shape: tuple[int, ...]) -> np.ndarray:
        return self._generator(site).standard_normal(shape)


def _sample_user_cat2(world: _World, users: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """A category_level_two per entry of users (any shape), from that user's long-term preference."""
    return np.searchsorted(world.user_cat_cdf, users + uniform, side="right") - users * _NUM_CAT2


def _sample_videos(world: _World, lo: np.ndarray, hi: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """A video in each internal range [lo, hi) (any shape), drawn proportionally to popularity."""
    cum = world.pop_cum
    target = cum[lo] + uniform * (cum[hi] - cum[lo])
    return np.clip(np.searchsorted(cum, target, side="right") - 1, lo, hi - 1)


def _draw_intents(world: _World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fresh intent per entry of users: half the time a favourite category, half the time a trending one."""
    favourite = _sample_user_cat2(world, users, rng.random(users.shape))
    everything = (np.zeros_like(users), np.full_like(users, len(world.quality)))
    trending = world.video_cat2[_sample_videos(world, *everything, rng.random(users.shape))]
    return np.where(rng.random(users.shape) < 0.5, favourite, trending)


def _retrieve(world: _World, config: SynthConfig, users: np.ndarray, intents: np.ndarray, recent: np.ndarray,
              streams: _Streams) -> np.ndarray:
    """The retrieval pool [C, P] of distinct internal video indices, from several channels.

    recent [C, RECENT_VIEWS] holds each user's last views as of the start of the day, -1 where missing.
    """
    n = {name: round(share * config.pool_size) for name, share in _CHANNELS.items()}
    n["tail"] = config.pool_size - sum(n.values())
    c, num_videos = len(users), len(world.quality)

    def draw(site: str, k: int) -> np.ndarray:
        return streams.uniform(site, (c, k))

    def in_ranges(bounds: np.ndarray, index: np.ndarray, site: str) -> np.ndarray:
        return _sample_videos(world, bounds[index], bounds[index + 1], draw(site, index.shape[1]))

    def favourites(k: int, site: str) -> np.ndarray:
        return in_ranges(world.cat2_bounds, _sample_user_cat2(world, users[:, None], draw(site, k)), site + ".video")

    # The recent channel expands a random one of the last views to its author or to its category; users
    # without views get favourite-category videos instead.
    seen = (recent >= 0).sum(axis=1, keepdims=True)
    pick = recent.shape[1] - 1 - (draw("recent.pick", n["recent"]) * np.maximum(seen, 1)).astype(np.int64)
    seed_video = np.take_along_axis(np.maximum(recent, 0), pick, axis=1)
    by_author = draw("recent.kind", n["recent"]) < 0.5
    author, cat = world.video_author[seed_video], world.video_cat2[seed_video]
    related = np.where(by_author, in_ranges(world.author_bounds, author, "recent.author"),
                       in_ranges(world.cat2_bounds, cat, "recent.category"))
    everything = np.zeros((c, 1), np.int64)  # category 0 starts at video 0 and the last one ends at num_videos
    pool = np.concatenate([
        favourites(n["interest"], "interest"),
        in_ranges(world.cat2_bounds, np.repeat(intents[:, None], n["intent"], axis=1), "intent"),
        np.where(seen > 0, related, favourites(n["recent"], "recent.fallback")),
        _sample_videos(world, everything, everything + num_videos, draw("popular", n["popular"])),
        (draw("tail", n["tail"]) * num_videos).astype(np.int64),
    ], axis=1)
    # Channels overlap. A repeat moves along its slot's own Weyl sequence (golden-ratio steps from a
    # uniform) until the row is distinct: row-local, so chunking cannot change the result.
    start, attempt = draw("repeat", config.pool_size), 0
    while True:
        order = np.argsort(pool, axis=1, kind="stable")
        ranked = np.take_along_axis(pool, order, axis=1)
        rows, cols = np.nonzero(ranked[:, 1:] == ranked[:, :-1])
        if rows.size == 0:
            return pool
        attempt += 1
        slots = order[rows, cols + 1]
        pool[rows, slots] = (np.modf(start[rows, slots] + attempt * _GOLDEN)[0] * num_videos).astype(np.int64)


def _split_top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions [C, k] of the top-k scores in descending order, and of the rest [C, n - k]."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k], order[:, k:]


def _sample(values: np.ndarray, k: int, keys: np.ndarray) -> np.ndarray:
    """k entries of each row, uniformly without replacement, in draw order: [C, n] -> [C, k] (keys [C, n])."""
    return np.take_along_axis(values, np.argsort(keys, axis=1)[:, :k], axis=1)


def _run_funnel(world: _World, config: SynthConfig, users: np.ndarray, intents: np.ndarray, hours: np.ndarray,
                recent: np.ndarray, streams: _Streams) -> dict[str, np.ndarray]:
    """Simulate retrieval → pre-rank → coarse → rank → re-rank for a chunk of C requests.

    Returns internal video indices 'rerank' [C, 20] (re-rank order), 'rank_pos' [C, 10], 'rank_neg'
    [C, 10], 'coarse_neg' [C, 40], 'prerank_neg' [C, 40] (sampling order), 'rank_index' [C, 10]
    (1-based), 'utility' [C, 20] (truth of the re-ranked items) and 'score_<group>' (the noise-free
    production ranking score of each group's items, for calibration).
    """
    pool = _retrieve(world, config, users, intents, recent, streams)  # [C, P]
    c = len(users)
    take = lambda values, positions: np.take_along_axis(values, positions, axis=1)  # noqa: E731
    interest = (world.video_vec[pool] @ world.user_vec[users][:, :, None])[..., 0] / np.sqrt(config.latent_dim)
    cat2 = world.video_cat2[pool]
    cat1 = world.cat1_of_cat2[cat2]
    intent = (cat2 == intents[:, None]) + 0.5 * (cat1 == world.cat1_of_cat2[intents][:, None])
    quality, log_pop = world.quality[pool], world.log_pop[pool]
    utility = interest + _W_INTENT * intent + _W_QUALITY * quality + _W_CONTEXT * world.context[hours[:, None], cat1]
    noise = streams.normal("noise", (c, 4, pool.shape[1])) * np.array(config.stage_noise)[:, None]  # [C, 4, P]

    prerank = interest + _PRERANK_POPULARITY * log_pop + _W_QUALITY * quality + noise[:, 0]
    pre_kept, pre_dropped = _split_top(prerank, config.prerank_keep)
    coarse = interest + _W_INTENT * intent + _W_QUALITY * quality + noise[:, 1]
    kept, dropped = _split_top(take(coarse, pre_kept), config.coarse_keep)
    coarse_kept, coarse_dropped = take(pre_kept, kept), take(pre_kept, dropped)
    kept, dropped = _split_top(take(utility + noise[:, 2], coarse_kept), _RANK_KEEP)
    rank_top, rank_dropped = take(coarse_kept, kept), take(coarse_kept, dropped)  # rank_top: [C, 20] in rank order
    slots = np.broadcast_to(np.arange(_RANK_KEEP), rank_top.shape)
    rank_slots = _sample(slots, _GROUP["rank_pos"], streams.uniform("rank_pos", slots.shape))

    rerank = take(utility + _RERANK_POPULARITY * log_pop + world.boost[world.items["upload_type"][pool]], rank_top)
    # Diversity pass: each better-scored item of the same category pushes an item down.
    top_cat = take(cat2, rank_top)
    crowded = (top_cat[:, :, None] == top_cat[:, None, :]) & (rerank[:, None, :] > rerank[:, :, None])  # [C, 20, 20]
    order, _ = _split_top(rerank - _DIVERSITY_PENALTY * crowded.sum(axis=2) + take(noise[:, 3], rank_top), _RANK_KEEP)
    reranked = take(rank_top, order)

    positions = {"rerank": reranked, "rank_pos": take(rank_top, rank_slots)}
    for label, dropped in (("rank_neg", rank_dropped), ("coarse_neg", coarse_dropped), ("prerank_neg", pre_dropped)):
        positions[label] = _sample(dropped, _GROUP[label], streams.uniform(label, dropped.shape))
    out = {name: take(pool, pos) for name, pos in positions.items()}
    out |= {f"score_{name}": take(utility, pos) for name, pos in positions.items()}
    return out | {"rank_index": rank_slots + 1, "utility": take(utility, reranked)}


def _feedback(world: _World, videos: np.ndarray, utility: np.ndarray,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Exposure and feedback of the re-ranked items [R, 20]: the first 1–6 are shown, feedback from the truth."""
    low, high = schema.LOGGED_PER_REQUEST["realshow"]
    shown = np.arange(videos.shape[1]) < rng.integers(low, high + 1, (len(videos), 1))
    watched = 1 / (1 + np.exp(-(utility - _WATCH_OFFSET + _WATCH_NOISE * rng.standard_normal(utility.shape))))
    playing = np.rint(watched * world.items["duration"][videos]).astype(np.int64)
    out = {"realshow": shown, "playing_time": playing * shown, "effective_view": shown & (watched > 0.5),
           "long_view": shown & (watched > 0.85)}
    for name, offset in _INTERACTION_OFFSETS.items():
        out[name] = shown & (rng.random(utility.shape) < 1 / (1 + np.exp(offset - utility)))
    return {name: values.astype(np.int64) for name, values in out.items()}


def _windows(values: dict[str, np.ndarray], start: np.ndarray, end: np.ndarray) -> dict[str, np.ndarray]:
    """Rows [end - SEQ_LEN, end) of each sorted event column, left-padded with 0 before start: [n, L]."""
    index = end[:, None] - schema.SEQ_LEN + np.arange(schema.SEQ_LEN)
    valid = index >= start[:, None]
    return {name: np.where(valid, column[np.maximum(index, 0)], 0) for name, column in values.items()}


def _histories(state: _UserState, requests: dict[str, np.ndarray], videos: np.ndarray,
               feedback: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each request's last SEQ_LEN effective views of strictly earlier requests [R, L]; rolls state forward.

    Carried views and today's views are merged into one array sorted by (user, request): a request's
    history is then the window that ends just before its own first event.
    """
    users, ts, request_ids = requests["user_id"], requests["request_timestamp"], requests["request_id"]
    num_requests, num_users = len(users), len(state.intent)
    request, slot = np.nonzero(feedback["effective_view"])  # today's views in time, then display order
    carried_user, carried_slot = np.nonzero(state.views["ts"] > 0)
    # Index 0 is a zero sentinel (key -1), so that padded window rows gather zeros.
    keys = np.concatenate([[-1], carried_user * (num_requests + 1), users[request] * (num_requests + 1) + request + 1])
    today = {"video": videos[request, slot], "ts": ts[request], "play": feedback["playing_time"][request, slot],
             "request": request_ids[request]}
    events = {name: np.concatenate([[0], state.views[name][carried_user, carried_slot], today[name]]) for name in today}
    order = np.argsort(keys, kind="stable")
    keys, events = keys[order], {name: column[order] for name, column in events.items()}
    base = users * (num_requests + 1)
    history = _windows(events, np.searchsorted(keys, base), np.searchsorted(keys, base + np.arange(num_requests) + 1))
    everyone = np.arange(num_users + 1) * (num_requests + 1)
    bounds = np.searchsorted(keys, everyone)
    state.views = _windows(events, bounds[:-1], bounds[1:])
    return history


def _item_columns(world: _World, videos: np.ndarray) -> dict[str, np.ndarray]:
    """The published item columns of internal video indices (any shape)."""
    return {name: column[videos] for name, column in world.items.items()}


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary name and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_pickle(path: Path, obj: Any, protocol: int) -> None:
    """Pickle obj to path through _write."""
    def dump(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)

    _write(path, dump)


def _all_stage(world: _World, requests: dict[str, np.ndarray], funnel: dict[str, np.ndarray],
               feedback: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per (request, video): the 20 re-ranked videos, then the other stages' negatives."""
    rerank, width = funnel["rerank"], _ALL_STAGE_ROWS
    videos = np.concatenate([rerank, funnel["rank_neg"], funnel["coarse_neg"], funnel["prerank_neg"]], axis=1)
    slot = np.broadcast_to(np.arange(width), videos.shape)
    group = np.searchsorted(np.cumsum([_RANK_KEEP, _GROUP["rank_neg"], _GROUP["coarse_neg"]]), slot, side="right")
    is_rank_pos = rerank[:, :, None] == funnel["rank_pos"][:, None, :]  # [R, 20, 10]
    pad = lambda values: np.pad(values, ((0, 0), (0, width - values.shape[1])))  # noqa: E731
    columns = {name: np.repeat(requests[name], width) for name in ("request_id", *schema.REQUEST_COLUMNS)}
    columns["user_id"] = np.repeat(world.user_ids[requests["user_id"]], width)
    columns |= _item_columns(world, videos)
    columns |= {
        "realshow": pad(feedback["realshow"]),
        "rerank_pos": slot < _GROUP["rerank_pos"],
        "rerank_neg": (group == 0) & (slot >= _GROUP["rerank_pos"]),
        "rank_pos": pad(is_rank_pos.any(axis=2)),
        "rank_neg": group == 1,
        "coarse_neg": group == 2,
        "prerank_neg": group == 3,
        "rank_index": pad((is_rank_pos * funnel["rank_index"][:, None, :]).sum(axis=2)),
        "rerank_index": np.where(slot < _GROUP["rerank_pos"], slot + 1, 0),
    }
    columns |= {name: pad(feedback[name]) for name in _FEEDBACK_COLUMNS}
    return pd.DataFrame({c: np.ascontiguousarray(columns[c], dtype=np.int64).ravel() for c in schema.ALL_STAGE_COLUMNS})


def _request_dict(world: _World, request_ids: np.ndarray, funnel: dict[str, np.ndarray],
                  feedback: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """{request_id: {stage label: [n, 8] int64}}, rows in sampling (or display) order."""
    n_pos, rerank, effective = _GROUP["rerank_pos"], funnel["rerank"], feedback["effective_view"]
    is_rank_pos = rerank[:, :, None] == funnel["rank_pos"][:, None, :]  # [R, 20, 10]
    groups = {
        "rerank_pos": (rerank[:, :n_pos], effective[:, :n_pos]),
        "rerank_neg": (rerank[:, n_pos:], effective[:, n_pos:]),
        "rank_pos": (funnel["rank_pos"], (is_rank_pos * effective[:, :, None]).sum(axis=1)),
    }
    for label in ("rank_neg", "coarse_neg", "prerank_neg"):
        groups[label] = (funnel[label], np.zeros_like(funnel[label]))  # never shown
    arrays = {}
    for label, (videos, views) in groups.items():
        item = _item_columns(world, videos)
        arrays[label] = np.stack([item[c] for c in schema.REQUEST_ARRAY_COLUMNS[:-1]] + [views], axis=-1)  # [R, n, 8]
    shown = feedback["realshow"][:, :n_pos] == 1  # a prefix of the display order
    per_request = {label: list(values) for label, values in arrays.items()}
    per_request["realshow"] = np.split(arrays["rerank_pos"][shown], np.cumsum(shown.sum(axis=1))[:-1])
    rows = zip(*(per_request[label] for label in schema.STAGE_LABELS))
    return dict(zip(request_ids.tolist(), (dict(zip(schema.STAGE_LABELS, row)) for row in rows)))


def _seq_dict(world: _World, request_ids: np.ndarray, history: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """{request_id: [SEQ_LEN, 10] int64}, left-padded with zero rows."""
    item = _item_columns(world, history["video"])
    valid = history["ts"] > 0
    seq = {c: item[c] * valid for c in schema.SEQ_COLUMNS[:7]}
    seq |= {"request_timestamp": history["ts"], "playing_time": history["play"], "request_id": history["request"]}
    return dict(zip(request_ids.tolist(), np.stack([seq[c] for c in schema.SEQ_COLUMNS], axis=-1)))  # [R, L, 10]


def _calibrate(funnel: dict[str, np.ndarray], seed: int) -> dict[str, dict[str, float]]:
    """Joint recall of random scores and of the noise-free production ranking score, per setting."""
    size = schema.GROUP_SIZE
    scores = {"rerank_pos": funnel["score_rerank"][:, :size], "rerank_neg": funnel["score_rerank"][:, size:]}
    scores |= {g: funnel[f"score_{g}"][:, :size] for g in ("rank_pos", "rank_neg", "coarse_neg", "prerank_neg")}
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for stages, quotas in schema.SERVING_QUOTAS.items():
        production = torch.from_numpy(np.concatenate([scores[g] for g in schema.GROUPS[stages]], axis=1))  # [R, N]
        target = torch.zeros(production.shape, dtype=torch.bool)
        target[:, :size] = True
        mask = torch.ones_like(target)
        recall = {
            "random": joint_recall([torch.rand(production.shape, generator=generator) for _ in quotas], target, mask,
                                   list(quotas), generator),
            "noise_free": joint_recall([production] * len(quotas), target, mask, list(quotas), generator),
        }
        result[f"{stages}-stage"] = {name: round(float(r.mean()), 4) for name, r in recall.items()}
    return result


def _draw_requests(world: _World, config: SynthConfig, state: _UserState, day: dt.date, first_id: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The day's requests in time order [R]: logged request columns, plus the hidden 'intent' and 'hour'.

    Advances each user's intent in state to the intent of their last request of the day.
    """
    num = config.requests_per_day
    users = rng.choice(config.num_users, num, p=world.user_activity)
    day_start = _day_start_ms(day)
    day_ms = _day_start_ms(day + dt.timedelta(days=1)) - day_start
    # Sorted draws plus 0..R-1 are strictly increasing, so request times are distinct and stay in the day.
    offsets = np.sort(rng.random(num) * (day_ms - num)).astype(np.int64) + np.arange(num)
    requests = {"request_id": first_id + np.arange(num), "request_timestamp": day_start + offsets, "user_id": users}
    requests |= {name: column[users] for name, column in world.users.items()}

    # Sticky intent chain: a request keeps its user's previous intent unless it switches; a forward fill
    # over the requests sorted by user replaces a loop over each user's requests.
    by_user = np.argsort(users, kind="stable")  # chronological within each user
    sorted_users = users[by_user]
    first = np.concatenate([[True], sorted_users[1:] != sorted_users[:-1]])
    switch = rng.random(num) >= config.intent_stickiness
    fresh = np.where(switch, _draw_intents(world, sorted_users, rng), state.intent[sorted_users])
    intents = fresh[np.maximum.accumulate(np.where(first | switch, np.arange(num), 0))]
    last = np.concatenate([first[1:], [True]])
    state.intent[sorted_users[last]] = intents[last]
    requests["intent"] = np.empty(num, np.int64)
    requests["intent"][by_user] = intents
    requests["hour"] = offsets // 3_600_000
    return requests


def _simulate(world: _World, config: SynthConfig, state: _UserState, requests: dict[str, np.ndarray],
              day_index: int) -> dict[str, np.ndarray]:
    """Run the funnel over the day's requests, chunk by chunk; see _run_funnel for the outputs [R, ...]."""
    users = requests["user_id"]
    # The recent channel reads a daily snapshot of the views, so chunks never wait on each other.
    recent = np.where(state.views["ts"][:, -_RECENT_VIEWS:] > 0, state.views["video"][:, -_RECENT_VIEWS:], -1)
    streams, chunks = _Streams(config.seed, _FUNNEL, day_index), []
    for lo in range(0, len(users), _CHUNK):
        part = slice(lo, lo + _CHUNK)
        chunks.append(_run_funnel(world, config, users[part], requests["intent"][part], requests["hour"][part],
                                  recent[users[part]], streams))
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def generate(config: SynthConfig, out_root: str | Path, progress: bool = True) -> SynthReport:
    """Write a synthetic twin of RecFlow in the published raw layout under out_root.

    Files of days outside config.day_list that already exist under out_root are left alone.

    Args:
        config: sizes and seed.
        out_root: raw root to write (all_stage/, realshow/, request_id_dict/, seq_effective_50_dict/, others/).
        progress: show a progress bar over days.

    Returns:
        The report, also written (without timing) to <out_root>/others/synth_report.json.
    """
    start, root = time.perf_counter(), Path(out_root)
    world = _build_world(config)
    users = np.arange(config.num_users)
    state = _UserState(
        intent=_draw_intents(world, users, np.random.default_rng([config.seed, _REQUESTS])),
        views={key: np.zeros((len(users), schema.SEQ_LEN), np.int64) for key in ("video", "ts", "play", "request")},
    )
    totals = dict(rows=0, shown=0, effective=0)
    for day_index, day in enumerate(tqdm(config.day_list, desc="synth days", unit="day", disable=not progress)):
        rng = np.random.default_rng([config.seed, _REQUESTS, day_index])
        requests = _draw_requests(world, config, state, day, 1 + day_index * config.requests_per_day, rng)
        funnel = _simulate(world, config, state, requests, day_index)
        rng = np.random.default_rng([config.seed, _FEEDBACK, day_index])
        feedback = _feedback(world, funnel["rerank"], funnel["utility"], rng)
        history = _histories(state, requests, funnel["rerank"], feedback)

        name = schema.day_name(day)
        frame = _all_stage(world, requests, funnel, feedback)
        if config.shuffle_rows:
            order = np.random.default_rng([config.seed, _LAYOUT, day_index]).permutation(len(frame))
            frame = frame.iloc[order].reset_index(drop=True)
        _write(root / schema.ALL_STAGE_DIR / f"{name}.feather", frame.to_feather)
        shown = frame[frame["realshow"] == 1].reset_index(drop=True)
        _write(root / schema.REALSHOW_DIR / f"{name}.feather", shown.to_feather)
        _write_pickle(root / schema.REQUEST_DICT_DIR / f"{name}.pkl",
                      _request_dict(world, requests["request_id"], funnel, feedback), config.pickle_protocol)
        _write_pickle(root / schema.SEQ_DICT_DIR / f"{name}.pkl", _seq_dict(world, requests["request_id"], history),
                      config.pickle_protocol)
        totals["rows"] += len(frame)
        totals["shown"] += len(shown)
        totals["effective"] += int(shown["effective_view"].sum())

    scaled = {"user_id": config.num_users, "device_id": config.num_devices, "video_id": config.num_videos,
              "author_id": config.num_authors} if config.vocab == "twin" else _RECFLOW_COUNTS
    counts = {field: scaled.get(field) or schema.RECFLOW_ID_COUNTS[field] for field in schema.ID_FIELDS}
    counts |= {alias: counts[field] for alias, field in schema.ID_CNT_ALIASES.items()}
    _write_pickle(root / schema.ID_CNT_PATH, counts, config.pickle_protocol)
    report = SynthReport(
        config=config, out_root=root, requests=config.days * config.requests_per_day, all_stage_rows=totals["rows"],
        realshow_rows=totals["shown"], effective_view_rate=round(totals["effective"] / max(totals["shown"], 1), 4),
        joint_recall=_calibrate(funnel, config.seed), seconds=0.0,
    )
    _write(root / REPORT_PATH, lambda tmp: tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n"))
    report.seconds = time.perf_counter() - start
    return report
