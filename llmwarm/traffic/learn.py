"""Profiles that learn from live traffic: the learn file, and a profile extended from it.

A server keeps a summary of the shapes it served (`coverage.Shape`: endpoint, stream,
features, adapter names, size classes, and a count; **never prompt or output text**) in the
learn file (`--learn FILE`, `LLMWARM_LEARN`, or `learned.json` inside `--cache-dir`). It is
written atomically every `WRITE_EVERY_S` while traffic comes, and at shutdown. The next start
reads it and extends the profile with the shapes its warm-up would miss (`extend`), at most
`MAX_LEARNED_BUCKETS` buckets, each at a lower priority than every bucket of the profile, so
a tight budget cuts them first. `profile from-coverage` merges many replicas' files into one
profile (`merge`, `profile_from`).

A file that cannot be read or is not a learn file is set aside (renamed, never deleted) with a
warning naming it; the server starts with an empty summary.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from llmwarm import files
from llmwarm.errors import ProfileError, WriteError
from llmwarm.model.features import Feature
from llmwarm.model.fit import CHAT_TEMPLATE_ALLOWANCE, EngineShape, for_engine
from llmwarm.model.profile import Bucket, EndpointName, Profile
from llmwarm.model.report import Learned
from llmwarm.traffic import fromlog
from llmwarm.traffic.coverage import Shape, Warmed, shapes_from

logger = logging.getLogger(__name__)

LEARN_VERSION: Literal[1] = 1
DIR_NAME = "learned"  # inside a writable --cache-dir: a file per replica
WRITE_EVERY_S = 60.0
MAX_LEARNED_BUCKETS = 4
MAX_MERGED_SHAPES = 4096  # rows of a learn directory's merged file (the most requested)


def _feature(text: str) -> str:
    Feature.parse(text)  # raises ValueError naming what is off
    return text


class LearnedShape(BaseModel):
    """One row of the learn file."""

    model_config = ConfigDict(extra="forbid")

    endpoint: EndpointName
    stream: bool
    features: list[Annotated[str, AfterValidator(_feature)]]
    prompt_tokens: int = Field(gt=0)
    concurrency: int = Field(gt=0)
    max_tokens: int = Field(gt=0)
    requests: int = Field(ge=0)


class LearnFile(BaseModel):
    """The learn file: what live traffic looked like, summed over the runs that wrote it."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = LEARN_VERSION
    model: str
    updated_at: datetime
    shapes: list[LearnedShape]


def rows(counts: Counter[Shape]) -> list[LearnedShape]:
    return [
        LearnedShape(
            endpoint=s.kind.endpoint,
            stream=s.kind.stream,
            features=[str(f) for f in s.kind.features],
            prompt_tokens=s.prompt_tokens,
            concurrency=s.concurrency,
            max_tokens=s.max_tokens,
            requests=n,
        )  # fmt: skip
        for s, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]


def _set_aside(path: Path, why: str) -> bool:
    """Rename a bad learn file out of the way; whether it was (else it must not be written)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.bad-{stamp}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        logger.warning(
            "learn file %s: %s, and it cannot be set aside (%s): learning without writing it",
            path, why, exc.strerror or exc,
        )  # fmt: skip
        return False
    logger.warning("learn file %s: %s; set aside as %s, starting a new one", path, why, aside)
    return True


# This process's own name in a learn directory: pods change names, and pods may share one.
_TOKEN = secrets.token_hex(4)
MERGED = "merged.json"  # a learn directory's files of processes gone, summed
_DIR_LOCK = ".llmwarm.lock"


def own_file(path: Path) -> Path:
    """The file this process writes: `path` itself, or in a learn directory (`--learn DIR/`, a
    fleet's) one of its own, named after its host (a pod's name) and itself."""
    return path / f"{socket.gethostname()}-{_TOKEN}.json" if path.is_dir() else path


def _owner_lock(file: Path) -> Path:
    return file.with_name(f".{file.stem}.lock")


def claim(path: Path) -> int | None:
    """Mark this process's file in a learn directory as in use for as long as the process
    lives (an exclusive lock the kernel lets go of whatever ends it): the descriptor, or None
    for a single learn file (one writer), or where it cannot be locked."""
    if not path.is_dir():
        return None
    try:
        fd = os.open(_owner_lock(own_file(path)), os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        logger.warning("learn directory %s: cannot lock this process's file (%s)", path, exc)
        return None
    return fd


def release(claim: int, path: Path | None) -> None:
    """This process's claim ends (a clean exit): its lock goes (its file stays, to be merged by
    a later start)."""
    if path is not None and path.is_dir():
        _owner_lock(own_file(path)).unlink(missing_ok=True)
    os.close(claim)


def _finished(directory: Path) -> list[Path]:
    """A learn directory's finished files (a writer's temporary ones start with a dot)."""
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


def _gone(file: Path) -> bool:
    """Whether the process that wrote a learn directory's file is gone (nobody holds its
    lock; a file without one is from before locks)."""
    try:
        fd = os.open(_owner_lock(file), os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _merge_gone(directory: Path) -> None:
    """Sum the files of processes gone into `MERGED` (its most requested shapes) and remove
    them, under the directory's lock: a fleet's directory holds a file per live replica and one
    more, however many pods came and went."""
    with files.locked(directory / _DIR_LOCK, fcntl.LOCK_EX):
        for lock in directory.glob(".*.lock"):  # of a process gone before it wrote its file
            if lock.name == _DIR_LOCK:
                continue
            stem = lock.name[1 : -len(".lock")]
            if not (directory / f"{stem}.json").exists() and _gone(directory / f"{stem}.json"):
                lock.unlink(missing_ok=True)
        gone = [f for f in _finished(directory) if f.name != MERGED and _gone(f)]
        if not gone:
            return
        merged, _ = _load(directory / MERGED)
        total = merged or Counter()
        for file in gone:
            counts, why = _load(file)
            if counts is None:
                _set_aside(file, why)
                continue
            total += counts
        model = next((m for m in map(_model, gone) if m), "")
        write(directory / MERGED, Counter(dict(total.most_common(MAX_MERGED_SHAPES))), model)
        for file in gone:
            for done in (file, _owner_lock(file)):
                done.unlink(missing_ok=True)
        logger.info("learn directory %s: %d files of processes gone merged", directory, len(gone))


def _load(path: Path) -> tuple[Counter[Shape] | None, str]:
    """A learn file's counts (none if there is no file), or why it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Counter(), ""
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    try:
        data = LearnFile.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "file"
        return None, f"not a learn file ({where}: {first['msg']})"
    return shapes_from(s.model_dump() for s in data.shapes), ""


def _model(file: Path) -> str:
    try:
        return LearnFile.model_validate_json(file.read_text(encoding="utf-8")).model
    except (OSError, UnicodeDecodeError, ValidationError):
        return ""


def read(path: Path) -> History:
    """What the learn file (or every finished file of a learn directory: a fleet's, its files
    of processes gone merged first) holds, and whether this process's own file may be written.
    Never raises: its own bad file is set aside with a warning, another replica's is left out
    with one."""
    if path.is_dir():
        try:
            _merge_gone(path)
        except (OSError, WriteError) as exc:
            logger.warning("learn directory %s: cannot merge its old files (%s)", path, exc)
    own = own_file(path)
    others = [p for p in _finished(path) if p != own] if path.is_dir() else []
    mine, why = _load(own)
    writable = True
    if mine is None:
        writable, mine = _set_aside(own, why), Counter()
    history = Counter(mine)
    for other in others:
        counts, why = _load(other)
        if counts is None:
            logger.warning("learn file %s: %s; left out", other, why)
            continue
        history += counts
    return History(history, mine, writable, 1 + len(others))


@dataclass(frozen=True)
class History:
    """What a start read: every file's counts, its own file's, whether that may be written,
    and how many files there were."""

    counts: Counter[Shape]
    own: Counter[Shape]
    writable: bool
    files: int


def size_classes(path: Path) -> Counter[tuple[int, int]]:
    """Requests per (prompt, concurrency) class in a learn file or directory; empty if there
    are none or they cannot be read (`read` deals with a bad file when the server starts)."""
    classes: Counter[tuple[int, int]] = Counter()
    for file in _finished(path) if path.is_dir() else [path]:
        counts, _ = _load(file)
        for shape, n in (counts or {}).items():
            classes[(shape.prompt_tokens, shape.concurrency)] += n
    return classes


def read_many(paths: list[Path]) -> Counter[Shape]:
    """Many replicas' files summed (`profile from-coverage`); a bad one is an error here."""
    total: Counter[Shape] = Counter()
    for path in paths:
        try:
            data = LearnFile.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(
                f"{path}: cannot be read", problems=[(str(path), str(exc))]
            ) from None
        except ValidationError as exc:
            raise ProfileError(
                f"{path} is not a learn file",
                problems=[
                    (f"{path}: {'.'.join(map(str, e['loc'])) or 'file'}", e["msg"])
                    for e in exc.errors()
                ],
            ) from None
        total += shapes_from(s.model_dump() for s in data.shapes)
    return total


def write(path: Path, counts: Counter[Shape], model: str) -> None:
    """Write the learn file atomically (raises `WriteError`)."""
    data = LearnFile(model=model, updated_at=datetime.now(timezone.utc), shapes=rows(counts))
    files.write_text(path, data.model_dump_json(indent=2) + "\n", "--learn")


def _with_shape(profile: Profile, shape: Shape, engine: EngineShape) -> tuple[Profile, Bucket]:
    """The profile that also warms `shape`: its bucket (at the lowest priority), endpoint,
    stream mode and features."""
    output = shape.max_tokens
    room = engine.max_model_len - output - CHAT_TEMPLATE_ALLOWANCE
    prompt = min(shape.prompt_tokens, room) if room > 0 else shape.prompt_tokens
    concurrency = min(shape.concurrency, engine.max_num_seqs)
    bucket = next(
        (b for b in profile.buckets
         if (b.prompt_tokens, b.concurrency, b.max_tokens) == (prompt, concurrency, output)),
        None,
    )  # fmt: skip
    buckets = list(profile.buckets)
    if bucket is None:
        lowest = min((b.priority for b in buckets), default=0)
        bucket = Bucket(
            prompt_tokens=prompt, concurrency=concurrency, max_tokens=output,
            priority=lowest - 1, name=f"learned-p{prompt}-c{concurrency}-o{output}",
        )  # fmt: skip
        buckets.append(bucket)
    use, adapters = list(profile.features.use), list(profile.features.lora)
    kind = shape.kind
    for feature in kind.features:
        if feature.name not in use:
            use.append(feature.name)
        if feature.name == "lora" and feature.arg not in adapters:
            adapters.append(str(feature.arg))
    crossed = profile.feature_buckets() | ({bucket.name} if kind.features else set())
    chosen = profile.endpoint_names()
    update: dict[str, Any] = {
        "buckets": buckets,
        "endpoints": chosen if kind.endpoint in chosen else [*chosen, kind.endpoint],
        "stream": [*profile.stream, *([] if kind.stream in profile.stream else [kind.stream])],
        "features": profile.features.model_copy(
            update={
                "use": use,
                "lora": adapters,
                "buckets": [b.name for b in buckets if b.name in crossed],
            }
        ),
    }
    return profile.model_copy(update=update), bucket


def extend(
    profile: Profile, counts: Counter[Shape], engine: EngineShape, source: str
) -> tuple[Profile, Learned | None]:
    """`profile` (resolved for `engine`) extended with the learned shapes it would miss, most
    requested first; a shape this engine cannot take (an adapter no longer loaded, a model
    that no longer serves the endpoint) is left out."""
    base = Warmed.from_profile(profile)
    added: list[str] = []
    for shape, _ in counts.most_common():
        if len(added) >= MAX_LEARNED_BUCKETS:
            break
        if not Warmed.from_profile(profile).misses(shape):
            continue
        candidate, bucket = _with_shape(profile, shape, engine)
        try:
            candidate = for_engine(candidate, engine)
        except ProfileError as exc:
            logger.info("learned shape %s left out: %s", shape.name, exc.message)
            continue
        profile = candidate
        if bucket.name not in added and bucket.name.startswith("learned-"):
            added.append(bucket.name)
    kinds = sorted(map(str, Warmed.from_profile(profile).kinds - base.kinds))
    if not added and not kinds:
        return profile, None
    return profile, Learned(file=source, buckets=added, kinds=kinds)


def profile_from(
    counts: Counter[Shape], coverage: float, sources: list[str]
) -> tuple[dict[str, Any], str]:
    """`profile from-coverage`: a profile (YAML-ready data) from summed learn files, and a
    comment saying what it covers."""
    total = sum(counts.values())
    if not total:
        raise ProfileError(
            "no requests in the learn files",
            problems=[(", ".join(sources), "every file is empty")],
        )
    classes: Counter[tuple[int, int, int]] = Counter()
    seen: Counter[str] = Counter()
    for shape, n in counts.items():
        classes[(shape.prompt_tokens, shape.concurrency, shape.max_tokens)] += n
        for feature in shape.kind.features:
            seen[feature.name] += n
    data, covered = fromlog.profile_data(
        classes, seen, {s.kind.endpoint for s in counts}, {s.kind.stream for s in counts}, coverage
    )
    adapters = sorted(
        str(f.arg) for f in {f for s in counts for f in s.kind.features} if f.name == "lora"
    )
    if adapters:
        data["features"]["use"].append("lora")
        data["features"]["lora"] = adapters
    use = data["features"]["use"]
    comment = [
        f"built by `llmwarm profile from-coverage` from {len(sources)} learn files: "
        f"{total} requests",
        f"buckets cover {covered / total:.1%} of requests (asked {coverage:.0%})",
        "features seen: " + (", ".join(f"{f} {seen[f] / total:.0%}" for f in use[1:]) or "none"),
    ]
    return data, "\n".join(f"# {line}" for line in comment)
