"""Real benchmark loaders: read each benchmark from a local copy in its official layout, as rows of the
embedded benchmark's schema (`resadapt.data.embedded.Sample`).

Why: the evaluation, calibration and reward code only knows one row schema, so a real benchmark is usable
wherever the embedded one is (same `datasets.Features`, so the tables concatenate), and
`resadapt.rewards.score` scores every row. Nothing is downloaded and no video is decoded here: fps,
num_frames and duration come from the annotations where they give them, else 0. Every malformed input
raises an error that names the benchmark, the file, the row and the field; a missing media file raises
an error that names the path (pass ``check_media=False`` to skip that check, e.g. for annotation-only
copies).

Tasks: ``multiple_choice`` (answer = option letter, options = texts without letters), ``open_qa``
(VideoMMMU open questions; answer = text), ``grounding`` (answer = "start-end" via ``format_span``,
rounded to 0.1 s; answer_span = the exact [start, end] s), ``grounded_qa`` (NExT-GQA: multiple choice, scored by the letter; the gold
evidence span is kept in answer_span), ``image_qa`` (ChartQA; answer = label text). Prompts are built by
``mc_prompt`` / ``open_prompt`` / ``grounding_prompt`` only.

Supported layouts (``root`` is the benchmark folder; paths below are relative to it). Sources consulted:
the Hugging Face dataset repos and the authors' loaders named per benchmark.

- ``videomme`` (lmms-lab/Video-MME): ``videomme/test-00000-of-00001.parquet`` with question_id, videoID,
  question, options (["A. ...", ...]), answer (letter); duration is a category (short/medium/long), so
  duration_s = 0. Videos ``data/<videoID>.mp4`` (the unzipped ``videos_chunked_*.zip``) or
  ``video/<videoID>.mp4``. Split: ``test`` only.
- ``longvideobench`` (longvideobench/LongVideoBench, its ``longvideobench_dataset.py``): ``lvb_val.json``
  (split ``val``, default) or ``lvb_test_wo_gt.json`` (split ``test``), rows with id, video_path,
  question, candidates, correct_choice (int; absent in the test file, whose rows get answer ""),
  duration (s). Videos ``videos/<video_path>``. Subtitles are not used.
- ``mlvu`` (MLVU/MVLU dev set, JUNJIE99/MLVU ``choice_bench.py``): ``json/<n>_<task>.json`` rows with video,
  question, candidates, answer (text of the right candidate), duration, question_type. Videos
  ``video/<n>_<task>/<video>`` (Hugging Face layout) or ``video/<task>/<video>`` (authors' code). The
  generation tasks ``8_sub_scene`` and ``9_summary`` have no candidates and are skipped. Split: a json
  stem (``1_plotQA`` or ``plotQA``) to load one task, default all.
- ``mvbench`` (OpenGVLab/MVBench, Ask-Anything ``video_chat2/mvbench.ipynb``): ``json/<task>.json`` rows
  with video, question, candidates, answer (text); videos ``video/<folder>/<video>`` with the folder per
  task from ``MVBENCH_VIDEO_DIRS``. All 20 json files are required unless split names one task. The
  clip bounds (start/end) of 5 tasks are not kept (the schema has no clip field), and
  ``episodic_reasoning`` points at a folder of 3-fps frames (``tvqa/frames_fps3_hq/<video>``), not a file.
- ``videommmu`` (lmms-lab/VideoMMMU, lmms-eval ``tasks/videommmu/utils.py``): ``<Track>/test-*.parquet``
  or ``<Track>/test/*.parquet`` for Track in Perception, Comprehension, Adaptation (split: a track,
  default all) with id (``<split>_<Subject>_<n>``), question, options, answer, question_type
  (``multiple-choice`` -> letter answer, ``open`` -> ``open_qa``). Videos ``<Category>/<id>.mp4`` (the
  unzipped Art/Business/Engineering/Humanities/Medicine/Science zips, category from the subject as in
  lmms-eval) or ``videos/<id>.mp4``. The Adaptation track's extra image is not used.
- ``lvbench`` (THUDM/LVBench): ``video_info.meta.jsonl`` or ``data/video_info.meta.jsonl``, one video per
  line with key, qa [{uid, question (with "(A) ..." option lines), answer (letter), question_type,
  time_reference}], video_info {duration_minutes, fps} (optional). Videos ``<key>.mp4``,
  ``videos/<key>.mp4``, ``all_videos/<key>.mp4``, or the ``videos/<shard>/<n>.mp4`` files written by the
  official video2dataset script (matched to keys through ``videos/<shard>.parquet`` url/key/status).
- ``charades_sta`` (Charades-STA): ``charades_sta_test.txt`` (split ``test``, default) or
  ``charades_sta_train.txt``, lines "VIDEO START END##sentence"; durations from the optional
  ``Charades_v1_test.csv`` / ``Charades_v1_train.csv`` (id, length). Videos ``Charades_v1_480/<VIDEO>.mp4``
  or ``videos/<VIDEO>.mp4``.
- ``activitynet_captions`` (ActivityNet Captions): ``val_2.json`` (split ``val_2``, default), ``val_1.json``
  or ``train.json``, in ``root`` or ``captions/``: {video_id: {duration, timestamps, sentences}}, one row
  per sentence (a reversed span is reordered). Videos ``[videos/]<id>.{mp4,mkv,webm}`` with or without
  the ``v_`` prefix.
- ``nextgqa`` (doc-doc/NExT-GQA ``datasets/nextgqa``): ``test.csv`` / ``val.csv`` (split ``test``, default)
  with video_id, qid, question, answer (the answer text, or an option index), a0..a4, frame_count;
  ``gsub_<split>.json`` {video_id: {duration, fps, location: {qid: [[s, e], ...]}}};
  ``map_vid_vidorID.json`` (or ``map_vid_vidorid.json``) video_id -> "<dir>/<id>". Videos
  ``NExTVideo/<dir>/<id>.mp4`` (NExT-QA release) or ``videos/<dir>/<id>.mp4``. A question with several
  gold segments keeps their hull [first start, last end] in answer_span (the official metric takes the max
  IoU over segments, which one span cannot express).
- ``chartqa`` (vis-nlp/ChartQA, "ChartQA Dataset" folder): ``<part>/<part>_human.json`` and
  ``<part>/<part>_augmented.json`` rows with imgname, query, label; images ``<part>/png/<imgname>``. Split:
  ``test`` (default; both subsets), ``val``, ``train``, or one subset such as ``test_human``.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resadapt.data.embedded import Sample, format_span

if TYPE_CHECKING:
    from datasets import Dataset, Features

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
GROUNDING_INSTRUCTION = 'Answer with its start and end time in seconds, as "start-end".'

# ---------------------------------------------------------------------------------------------------------
# Schema and prompts


def benchmark_features() -> Features:
    """The `datasets.Features` of a benchmark table, derived from the `Sample` fields (so real and embedded
    tables concatenate; an empty answer_span is still a list of float64)."""
    from datasets import Features, List, Value

    types = {
        "str": Value("string"),
        "float": Value("float64"),
        "int": Value("int64"),
        "list[str]": List(Value("string")),
        "list[float]": List(Value("float64")),
        "list[int]": List(Value("int64")),
    }
    return Features({f.name: types[str(f.type)] for f in fields(Sample)})


def option_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ..."""
    if not 0 <= index < 26:
        raise ValueError(f"option index {index} has no letter")
    return chr(65 + index)


def mc_prompt(question: str, options: Sequence[str]) -> str:
    """The question, one "A. option" line per option, then the answer instruction."""
    lines = [question.strip(), *(f"{option_letter(i)}. {o}" for i, o in enumerate(options))]
    return "\n".join([*lines, MC_INSTRUCTION])


def open_prompt(question: str) -> str:
    return f"{question.strip()}\n{OPEN_INSTRUCTION}"


def grounding_prompt(query: str) -> str:
    return f'When does this happen in the video: "{query.strip()}"? {GROUNDING_INSTRUCTION}'


# ---------------------------------------------------------------------------------------------------------
# Reading and checking fields


def _where(bench: str, path: Path, root: Path, row: int | str, kind: str = "row") -> str:
    return f"{bench} {path.relative_to(root).as_posix()} {kind} {row}"


def _get(row: Any, key: str, where: str) -> Any:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with field {key!r}, got {type(row).__name__}")
    if not _present(row, key):
        raise ValueError(f"{where}: field {key!r} missing")
    return row[key]


def _str(row: Any, key: str, where: str, convert: bool = False) -> str:
    """A non-empty string field; `convert` also accepts numbers (ids)."""
    value = _get(row, key, where)
    if convert and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _num(row: Any, key: str, where: str) -> float:
    value = _get(row, key, where)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {key!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return out


def _opt_num(row: Mapping, key: str, where: str) -> float:
    """A number field that may be absent (0.0 then)."""
    return _num(row, key, where) if _present(row, key) else 0.0


def _present(row: Mapping, key: str) -> bool:
    """Whether `key` holds a value (None, NaN from parquet and "" from csv count as absent)."""
    value = row.get(key)
    if isinstance(value, str):
        return value != ""
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def _pair(value: Any, where: str) -> tuple[float, float]:
    """A [start, end] pair of finite numbers (seconds), put in order."""
    numbers = isinstance(value, list | tuple) and len(value) == 2
    numbers = numbers and all(isinstance(t, int | float) and not isinstance(t, bool) for t in value)
    if not numbers or not all(math.isfinite(t) for t in value):
        raise ValueError(f"{where}: expected [start, end] in seconds, got {value!r}")
    return float(min(value)), float(max(value))


def _str_list(row: Any, key: str, where: str) -> list[str]:
    """A non-empty list of non-empty strings (a list, an array from parquet, or a list's repr)."""
    value = _get(row, key, where)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of strings, got {value!r}")
    return [v.strip() for v in value]


def _strip_letters(options: list[str]) -> list[str]:
    """Drop "A. " / "(A) " prefixes when every option carries its own letter."""
    pats = [re.compile(rf"^\(?{option_letter(i)}[.):]\s*") for i in range(len(options))]
    if all(p.match(o) for p, o in zip(pats, options, strict=True)):
        return [p.sub("", o, count=1) for p, o in zip(pats, options, strict=True)]
    return options


def _letter_answer(answer: str, options: Sequence[str], where: str, key: str = "answer") -> str:
    letter = answer.strip().strip("()").rstrip(".").upper()
    letters = [option_letter(i) for i in range(len(options))]
    if letter not in letters:
        raise ValueError(f"{where}: field {key!r} must be one of {letters}, got {answer!r}")
    return letter


def _text_answer(answer: str, options: Sequence[str], where: str, key: str = "answer") -> str:
    """The letter of the option whose text is `answer`."""
    matches = [i for i, o in enumerate(options) if o.strip() == answer.strip()]
    if not matches:
        raise ValueError(f"{where}: field {key!r} ({answer!r}) is not one of the options {list(options)}")
    return option_letter(matches[0])


def _media(root: Path, candidates: Sequence[str], where: str, check: bool) -> str:
    """The first candidate path (relative to root) that exists; with `check`, an error naming them all
    when none does, else the first candidate."""
    for rel in candidates:
        if (root / rel).exists():
            return rel
    if check:
        tried = ", ".join(str(root / c) for c in candidates)
        raise FileNotFoundError(f"{where}: media file not found: {tried}")
    return candidates[0]


def _annotation(root: Path, names: Sequence[str], bench: str) -> Path:
    """The first of `names` (relative to root) that exists, else an error naming every one."""
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{bench}: annotation file not found: " + " or ".join(str(root / n) for n in names)
    )


def _load_json(path: Path, bench: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{bench} {path}: not valid JSON ({exc})") from None


def _load_list(path: Path, root: Path, bench: str) -> list:
    data = _load_json(path, bench)
    if not isinstance(data, list):
        raise ValueError(f"{bench} {path.relative_to(root).as_posix()}: expected a JSON list of rows")
    return data


def _load_dict(path: Path, root: Path, bench: str) -> dict:
    data = _load_json(path, bench)
    if not isinstance(data, dict):
        raise ValueError(f"{bench} {path.relative_to(root).as_posix()}: expected a JSON object")
    return data


def _load_parquet(path: Path, bench: str) -> list[dict]:
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict(orient="records")
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{bench} {path}: not a readable parquet file ({exc})") from None


def _load_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _split(split: str | None, allowed: Sequence[str], bench: str) -> str:
    """`split` (default: the first allowed), checked."""
    chosen = allowed[0] if split is None else split
    if chosen not in allowed:
        raise ValueError(f"{bench}: unknown split {split!r}; expected one of {list(allowed)}")
    return chosen


def _mc(
    sample_id: str,
    media_path: str,
    question: str,
    options: list[str],
    answer: str,
    source: str,
    duration_s: float = 0.0,
    **extra: Any,
) -> Sample:
    return Sample(
        sample_id,
        extra.pop("task", "multiple_choice"),
        "video",
        media_path,
        mc_prompt(question, options),
        answer,
        options=options,
        fps=extra.pop("fps", 0.0),
        num_frames=extra.pop("num_frames", 0),
        duration_s=duration_s,
        source=source,
        **extra,
    )


def _grounding(
    sample_id: str, media_path: str, query: str, start: float, end: float, source: str, duration_s: float
) -> Sample:
    return Sample(
        sample_id,
        "grounding",
        "video",
        media_path,
        grounding_prompt(query),
        format_span(start, end),
        fps=0.0,
        num_frames=0,
        duration_s=duration_s,
        answer_span=[start, end],
        source=source,
    )


# ---------------------------------------------------------------------------------------------------------
# One loader per benchmark: (root, split, check_media) -> list[Sample]


def load_videomme(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "VideoMME"
    _split(split, ("test",), bench)
    path = _annotation(root, ["videomme/test-00000-of-00001.parquet"], bench)
    out = []
    for i, row in enumerate(_load_parquet(path, bench)):
        where = _where(bench, path, root, i)
        vid = _str(row, "videoID", where)
        options = _strip_letters(_str_list(row, "options", where))
        out.append(
            _mc(
                _str(row, "question_id", where, convert=True),
                _media(root, [f"data/{vid}.mp4", f"video/{vid}.mp4"], where, check_media),
                _str(row, "question", where),
                options,
                _letter_answer(_str(row, "answer", where), options, where),
                "videomme",
            )
        )
    return out


def load_longvideobench(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "LongVideoBench"
    split = _split(split, ("val", "test"), bench)
    path = _annotation(root, ["lvb_val.json" if split == "val" else "lvb_test_wo_gt.json"], bench)
    out = []
    for i, row in enumerate(_load_list(path, root, bench)):
        where = _where(bench, path, root, i)
        options = _str_list(row, "candidates", where)
        answer = ""  # the test file has no ground truth
        if split == "val" or _present(row, "correct_choice"):
            choice = _get(row, "correct_choice", where)
            if not isinstance(choice, int) or isinstance(choice, bool) or not 0 <= choice < len(options):
                raise ValueError(f"{where}: field 'correct_choice' must be an option index, got {choice!r}")
            answer = option_letter(choice)
        out.append(
            _mc(
                _str(row, "id", where, convert=True),
                _media(root, [f"videos/{_str(row, 'video_path', where)}"], where, check_media),
                _str(row, "question", where),
                options,
                answer,
                "longvideobench",
                duration_s=_opt_num(row, "duration", where),
            )
        )
    return out


MLVU_GENERATION_TASKS = ("8_sub_scene", "9_summary")


def load_mlvu(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "MLVU"
    files = sorted(p for p in (root / "json").glob("*.json") if p.stem not in MLVU_GENERATION_TASKS)
    if not files:
        raise FileNotFoundError(f"{bench}: no multiple-choice annotation files json/*.json under {root}")
    if split is not None:
        files = [p for p in files if split in (p.stem, re.sub(r"^\d+_", "", p.stem))]
        if not files:
            raise ValueError(f"{bench}: no annotation file json/<n>_{split}.json under {root}")
    out = []
    for path in files:
        task = re.sub(r"^\d+_", "", path.stem)
        for i, row in enumerate(_load_list(path, root, bench)):
            where = _where(bench, path, root, i)
            video = _str(row, "video", where)
            options = _str_list(row, "candidates", where)
            out.append(
                _mc(
                    f"{path.stem}_{i}",
                    _media(root, [f"video/{path.stem}/{video}", f"video/{task}/{video}"], where, check_media),
                    _str(row, "question", where),
                    options,
                    _text_answer(_str(row, "answer", where), options, where),
                    "mlvu",
                    duration_s=_opt_num(row, "duration", where),
                )
            )
    return out


# task (json stem) -> folder under video/, from the official MVBench data_list (Ask-Anything mvbench.ipynb)
MVBENCH_VIDEO_DIRS: dict[str, str] = {
    "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",  # a folder of frames per item, not a video file
    "counterfactual_inference": "clevrer/video_validation",
}


def load_mvbench(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "MVBench"
    tasks = list(MVBENCH_VIDEO_DIRS) if split is None else [_split(split, list(MVBENCH_VIDEO_DIRS), bench)]
    out = []
    for task in tasks:
        path = _annotation(root, [f"json/{task}.json"], bench)
        for i, row in enumerate(_load_list(path, root, bench)):
            where = _where(bench, path, root, i)
            options = _str_list(row, "candidates", where)
            video = f"video/{MVBENCH_VIDEO_DIRS[task]}/{_str(row, 'video', where)}"
            out.append(
                _mc(
                    f"{task}_{i}",
                    _media(root, [video], where, check_media),
                    _str(row, "question", where),
                    options,
                    _text_answer(_str(row, "answer", where), options, where),
                    "mvbench",
                )
            )
    return out


# video folder -> subjects, as lmms-eval's videommmu get_cache_dir
_VIDEOMMMU_SUBJECTS = {
    "Art": "Art Art_Theory Design Music",
    "Science": "Biology Chemistry Geography Math Physics",
    "Humanities": "History Literature Sociology Psychology",
    "Engineering": "Agriculture Architecture_and_Engineering Computer_Science Electronics Energy_and_Power "
    "Materials Mechanical_Engineering",
    "Medicine": "Basic_Medical_Science Clinical_Medicine Diagnostics_and_Laboratory_Medicine Pharmacy "
    "Public_Health",
    "Business": "Accounting Economics Finance Manage Marketing",
}
_VIDEOMMMU_CATEGORY = {s: cat for cat, subjects in _VIDEOMMMU_SUBJECTS.items() for s in subjects.split()}
VIDEOMMMU_TRACKS = ("Perception", "Comprehension", "Adaptation")


def load_videommmu(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "VideoMMMU"
    tracks = VIDEOMMMU_TRACKS if split is None else [_split(split.capitalize(), VIDEOMMMU_TRACKS, bench)]
    out = []
    for track in tracks:
        paths = sorted((root / track).glob("test-*.parquet")) or sorted((root / track).glob("test/*.parquet"))
        if not paths:
            raise FileNotFoundError(f"{bench}: no annotation file {root / track}/test-*.parquet")
        for path in paths:
            for i, row in enumerate(_load_parquet(path, bench)):
                where = _where(bench, path, root, i)
                qid = _str(row, "id", where, convert=True)
                category = _VIDEOMMMU_CATEGORY.get("_".join(qid.split("_")[1:-1]))
                videos = ([f"{category}/{qid}.mp4"] if category else []) + [f"videos/{qid}.mp4"]
                media = _media(root, videos, where, check_media)
                question, answer = _str(row, "question", where), _str(row, "answer", where, convert=True)
                if _str(row, "question_type", where) == "open":
                    prompt = open_prompt(question)
                    out.append(
                        Sample(
                            qid, "open_qa", "video", media, prompt, answer, num_frames=0, source="videommmu"
                        )
                    )
                    continue
                options = _strip_letters(_str_list(row, "options", where))
                out.append(
                    _mc(qid, media, question, options, _letter_answer(answer, options, where), "videommmu")
                )
    return out


_LVBENCH_OPTION = re.compile(r"\s*\n\s*\(([A-Z])\)\s*")  # an option line "(A) ..."


def _lvbench_video_map(root: Path) -> dict[str, str]:
    """YouTube id -> path of the official video2dataset download (``videos/<shard>/<key>.mp4``)."""
    out = {}
    for shard in sorted((root / "videos").glob("*.parquet")):
        for row in _load_parquet(shard, "LVBench"):
            url, key = str(row.get("url", "")), row.get("key")
            if key is not None and "v=" in url and row.get("status", "success") == "success":
                out[url.split("v=", 1)[1].split("&")[0]] = f"videos/{shard.stem}/{key}.mp4"
    return out


def load_lvbench(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "LVBench"
    _split(split, ("test",), bench)
    path = _annotation(root, ["video_info.meta.jsonl", "data/video_info.meta.jsonl"], bench)
    shards = _lvbench_video_map(root)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{bench} {path.relative_to(root).as_posix()} line {n}"
        try:
            video = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        key = _str(video, "key", where, convert=True)
        info = video.get("video_info") if isinstance(video.get("video_info"), Mapping) else {}
        duration = _opt_num(info, "duration_minutes", f"{where} video_info") * 60.0
        fps = _opt_num(info, "fps", f"{where} video_info")
        candidates = ([shards[key]] if key in shards else []) + [
            f"{key}.mp4",
            f"videos/{key}.mp4",
            f"all_videos/{key}.mp4",
        ]
        media = _media(root, candidates, where, check_media)
        qas = _get(video, "qa", where)
        if not isinstance(qas, list):
            raise ValueError(f"{where}: field 'qa' must be a list, got {type(qas).__name__}")
        for j, qa in enumerate(qas):
            qwhere = f"{where} qa {j}"
            parts = _LVBENCH_OPTION.split(_str(qa, "question", qwhere))
            letters, options = parts[1::2], [p.strip() for p in parts[2::2]]
            if not options or letters != [option_letter(k) for k in range(len(letters))] or not all(options):
                raise ValueError(
                    f"{qwhere}: field 'question' must end with option lines '(A) ...', '(B) ...'"
                )
            out.append(
                _mc(
                    _str(qa, "uid", qwhere, convert=True),
                    media,
                    parts[0].strip(),
                    options,
                    _letter_answer(_str(qa, "answer", qwhere), options, qwhere),
                    "lvbench",
                    duration_s=duration,
                    fps=fps,
                )
            )
    return out


def load_charades_sta(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "Charades-STA"
    split = _split(split, ("test", "train"), bench)
    path = _annotation(root, [f"charades_sta_{split}.txt"], bench)
    durations: dict[str, float] = {}
    info = root / f"Charades_v1_{split}.csv"
    if info.is_file():
        for i, row in enumerate(_load_csv(info)):
            where = _where(bench, info, root, i)
            durations[_str(row, "id", where)] = _num(row, "length", where)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{bench} {path.relative_to(root).as_posix()} line {n}"
        head, sep, sentence = line.partition("##")
        parts = head.split()
        try:
            vid, start, end = parts[0], float(parts[1]), float(parts[2])
            if not sep or len(parts) != 3 or not sentence.strip():
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(f"{where}: expected 'VIDEO START END##sentence', got {line!r}") from None
        start, end = _pair([start, end], where)
        media = _media(root, [f"Charades_v1_480/{vid}.mp4", f"videos/{vid}.mp4"], where, check_media)
        out.append(
            _grounding(f"{vid}_{n}", media, sentence, start, end, "charades_sta", durations.get(vid, 0.0))
        )
    return out


def load_activitynet_captions(
    root: str | Path, split: str | None = None, check_media: bool = True
) -> list[Sample]:
    root, bench = Path(root), "ActivityNet Captions"
    split = _split(split, ("val_2", "val_1", "train"), bench)
    path = _annotation(root, [f"{split}.json", f"captions/{split}.json"], bench)
    out = []
    for vid, video in _load_dict(path, root, bench).items():
        where = _where(bench, path, root, vid, kind="video")
        stamps, sentences = _get(video, "timestamps", where), _str_list(video, "sentences", where)
        if not isinstance(stamps, list) or len(stamps) != len(sentences):
            raise ValueError(f"{where}: field 'timestamps' must be a list of one [start, end] per sentence")
        bare = vid[2:] if vid.startswith("v_") else vid
        names = [vid, bare if bare != vid else f"v_{vid}"]
        candidates = [
            f"{d}{n}.{ext}" for d in ("", "videos/") for n in names for ext in ("mp4", "mkv", "webm")
        ]
        media = _media(root, candidates, where, check_media)
        duration = _opt_num(video, "duration", where)
        for k, (span, sentence) in enumerate(zip(stamps, sentences, strict=True)):
            start, end = _pair(span, f"{where} field 'timestamps' item {k}")
            out.append(
                _grounding(f"{vid}_{k}", media, sentence, start, end, "activitynet_captions", duration)
            )
    return out


def load_nextgqa(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "NExT-GQA"
    split = _split(split, ("test", "val"), bench)
    qa_path = _annotation(root, [f"{split}.csv"], bench)
    span_path = _annotation(root, [f"gsub_{split}.json"], bench)
    map_path = _annotation(root, ["map_vid_vidorID.json", "map_vid_vidorid.json"], bench)
    spans, vid_map = _load_dict(span_path, root, bench), _load_dict(map_path, root, bench)
    out = []
    for i, row in enumerate(_load_csv(qa_path)):
        where = _where(bench, qa_path, root, i)
        vid, qid = _str(row, "video_id", where), _str(row, "qid", where)
        options = [_str(row, f"a{k}", where) for k in range(5)]
        answer = _str(row, "answer", where)
        if answer.isdigit() and answer not in options:  # an option index (NExT-QA style)
            if int(answer) >= len(options):
                raise ValueError(f"{where}: field 'answer' index {answer} is out of range for 5 options")
            letter = option_letter(int(answer))
        else:
            letter = _text_answer(answer, options, where)
        gwhere = f"{bench} {span_path.name} video {vid}"
        video = _get(spans, vid, f"{bench} {span_path.name}")
        segments = _get(_get(video, "location", gwhere), qid, f"{gwhere} location")
        if not isinstance(segments, list) or not segments:
            raise ValueError(f"{gwhere} location {qid}: expected a list of [start, end], got {segments!r}")
        segments = [_pair(s, f"{gwhere} location {qid}") for s in segments]
        mapped = _str(vid_map, vid, f"{bench} {map_path.name}")
        media = _media(root, [f"NExTVideo/{mapped}.mp4", f"videos/{mapped}.mp4"], where, check_media)
        question = _str(row, "question", where)
        out.append(
            _mc(
                f"{vid}_{qid}",
                media,
                question if question.endswith("?") else f"{question}?",
                options,
                letter,
                "nextgqa",
                duration_s=_opt_num(video, "duration", gwhere),
                task="grounded_qa",
                fps=_opt_num(video, "fps", gwhere),
                num_frames=int(_opt_num(row, "frame_count", where)),
                answer_span=[min(s[0] for s in segments), max(s[1] for s in segments)],
            )
        )
    return out


def load_chartqa(root: str | Path, split: str | None = None, check_media: bool = True) -> list[Sample]:
    root, bench = Path(root), "ChartQA"
    allowed = [f"{p}{s}" for p in ("test", "val", "train") for s in ("", "_human", "_augmented")]
    part, _, subset = _split(split, allowed, bench).partition("_")
    out = []
    for sub in [subset] if subset else ["human", "augmented"]:
        path = _annotation(root, [f"{part}/{part}_{sub}.json"], bench)
        for i, row in enumerate(_load_list(path, root, bench)):
            where = _where(bench, path, root, i)
            media = _media(root, [f"{part}/png/{_str(row, 'imgname', where)}"], where, check_media)
            label = _str(row, "label", where, convert=True)
            out.append(
                Sample(
                    f"{part}_{sub}_{i}",
                    "image_qa",
                    "image",
                    media,
                    open_prompt(_str(row, "query", where)),
                    label,
                    num_frames=1,
                    source="chartqa",
                )
            )
    return out


Loader = Callable[..., list[Sample]]
LOADERS: dict[str, Loader] = {
    "videomme": load_videomme,
    "longvideobench": load_longvideobench,
    "mlvu": load_mlvu,
    "mvbench": load_mvbench,
    "videommmu": load_videommmu,
    "lvbench": load_lvbench,
    "charades_sta": load_charades_sta,
    "activitynet_captions": load_activitynet_captions,
    "nextgqa": load_nextgqa,
    "chartqa": load_chartqa,
}


def _canonical(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_real_benchmark(
    name: str,
    root: str | Path,
    split: str | None = None,
    limit: int | None = None,
    check_media: bool = True,
) -> Dataset:
    """A `datasets.Dataset` of one real benchmark read from `root` (its official layout), with the embedded
    benchmark's row schema; `limit` keeps the first rows. `name` is a `LOADERS` key (case, '-' and '_'
    ignored)."""
    from datasets import Dataset

    by_name = {_canonical(k): k for k in LOADERS}
    key = by_name.get(_canonical(name))
    if key is None:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(LOADERS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{key}: benchmark folder {root} does not exist")
    if limit is not None and limit < 0:
        raise ValueError(f"{key}: limit must be >= 0, got {limit}")
    samples = LOADERS[key](root, split, check_media)
    if not samples:
        raise ValueError(f"{key}: no rows in the annotations under {root}")
    rows = [asdict(s) for s in samples[:limit]]
    return Dataset.from_list(rows, features=benchmark_features())
