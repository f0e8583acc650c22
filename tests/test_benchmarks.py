"""Tests for resadapt.data.benchmarks: each real benchmark loader reads a tiny fixture written in the official
layout into exact rows of the embedded schema that `rewards.score` can score, and every bad input fails
with an error naming the benchmark, the file and the field (or the missing media path)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, List, Value, concatenate_datasets
from PIL import Image

from resadapt.data.benchmarks import (
    LOADERS,
    MC_INSTRUCTION,
    MVBENCH_VIDEO_DIRS,
    OPEN_INSTRUCTION,
    benchmark_features,
    grounding_prompt,
    load_real_benchmark,
    mc_prompt,
)
from resadapt.data.embedded import Sample, format_span
from resadapt.rewards import score


def touch(path: Path) -> Path:
    """An empty placeholder media file (loaders never decode media)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(sample_id: str, task: str, media: str, question: str, answer: str, source: str, **kw) -> dict:
    """The expected row, as the loaders write it (defaults as for real data)."""
    kw = {"fps": 0.0, "num_frames": 0, **kw}
    return asdict(
        Sample(sample_id, task, kw.pop("media_type", "video"), media, question, answer, source=source, **kw)
    )


def check_table(ds: Dataset, root: Path) -> list[dict]:
    """Schema, media paths and scoring checks shared by every benchmark; returns the rows."""
    assert ds.features == benchmark_features()
    rows = ds.to_list()
    for r in rows:
        assert not Path(r["media_path"]).is_absolute() and (root / r["media_path"]).exists()
        if r["task"] == "grounding":
            assert r["answer"] == format_span(*r["answer_span"])  # rounded to 0.1 s; the span is exact
            gold, wrong = "{}-{}".format(*r["answer_span"]), "500.0-600.0"
        elif r["options"]:
            gold = r["answer"]
            wrong = next(chr(65 + i) for i in range(len(r["options"])) if chr(65 + i) != r["answer"])
        else:
            gold, wrong = r["answer"], "wrong"
        args = (r["answer"], r["options"], r["answer_span"])
        assert score(r["task"], gold, *args) == 1.0, r["id"]
        assert score(r["task"], wrong, *args) == 0.0, r["id"]
    return rows


# ---------------------------------------------------------------------------------------------------------
# Fixtures in the official layouts


def videomme(root: Path) -> Path:
    rows = [
        dict(
            video_id="001",
            duration="short",
            domain="Knowledge",
            sub_category="Humanity & History",
            url="https://www.youtube.com/watch?v=fFjv93ACGo8",
            videoID="fFjv93ACGo8",
            question_id="001-1",
            task_type="Counting Problem",
            question="How many people appear?",
            options=["A. One.", "B. Two.", "C. Three.", "D. Four."],
            answer="C",
        ),
        dict(
            video_id="002",
            duration="long",
            domain="Sports",
            sub_category="Football",
            url="https://www.youtube.com/watch?v=abc",
            videoID="abc",
            question_id="002-3",
            task_type="OCR Problems",
            question="What is written?",
            options=["A. x", "B. y", "C. z", "D. w"],
            answer="A",
        ),
    ]
    write_parquet(root / "videomme/test-00000-of-00001.parquet", rows)
    touch(root / "data/fFjv93ACGo8.mp4")
    touch(root / "data/abc.mp4")
    return root


def longvideobench(root: Path) -> Path:
    common = dict(subtitle_path="86CxyhFV9MI_en.json", starting_timestamp_for_subtitles=0, duration_group=600)
    write_json(
        root / "lvb_val.json",
        [
            dict(
                video_id="86CxyhFV9MI",
                question="Which subtitle appears with the red car?",
                candidates=["hello", "bye", "stop"],
                correct_choice=1,
                id="86CxyhFV9MI_0",
                video_path="86CxyhFV9MI.mp4",
                duration=512.5,
                **common,
            )
        ],
    )
    write_json(
        root / "lvb_test_wo_gt.json",
        [
            dict(
                video_id="t1",
                question="Q?",
                candidates=["a", "b"],
                id="t1_0",
                video_path="t1.mp4",
                duration=30.0,
                **common,
            )
        ],
    )
    touch(root / "videos/86CxyhFV9MI.mp4")
    touch(root / "videos/t1.mp4")
    return root


def mlvu(root: Path) -> Path:
    write_json(
        root / "json/1_plotQA.json",
        [
            dict(
                video="movie101_66.mp4",
                duration=246,
                question="What color is the main character's shirt?",
                candidates=["Yellow", "Red", "Green", "Blue"],
                answer="Green",
                question_type="plotQA",
            )
        ],
    )
    write_json(
        root / "json/2_needle.json",
        [dict(video="needle_32.mp4", duration=467.1, question="Q?", candidates=["a", "b"], answer="a")],
    )
    write_json(
        root / "json/9_summary.json", [dict(video="s.mp4", duration=1, question="Summarize.", answer="...")]
    )
    touch(root / "video/1_plotQA/movie101_66.mp4")  # Hugging Face layout
    touch(root / "video/needle/needle_32.mp4")  # the authors' code layout
    return root


def mvbench(root: Path) -> Path:
    for task, folder in MVBENCH_VIDEO_DIRS.items():
        video = f"{task}_clip" if task == "episodic_reasoning" else f"{task}_0.mp4"
        item = dict(video=video, question=f"{task} question?", candidates=["yes", "no", "maybe"], answer="no")
        if task in ("action_sequence", "episodic_reasoning"):
            item.update(start=1.5, end=9.0)
        write_json(root / f"json/{task}.json", [item])
        if task == "episodic_reasoning":
            (root / "video" / folder / video).mkdir(parents=True)
        else:
            touch(root / "video" / folder / video)
    return root


def videommmu(root: Path) -> Path:
    write_parquet(
        root / "Perception/test-00000-of-00001.parquet",
        [
            dict(
                id="validation_Art_Theory_3",
                question="Which painting is shown?",
                options=["Mona Lisa", "Starry Night", "The Scream"],
                answer="B",
                link_selected="https://youtube.com/x",
                question_type="multiple-choice",
            )
        ],
    )
    write_parquet(
        root / "Comprehension/test/0000.parquet",  # the parquet-converter layout
        [
            dict(
                id="validation_Math_12",
                question="What is the value of x?",
                options=[],
                answer="42",
                question_type="open",
            )
        ],
    )
    write_parquet(
        root / "Adaptation/test-00000-of-00001.parquet",
        [
            dict(
                id="validation_Accounting_5",
                question="<image 1> Which entry is right?",
                options=["A. debit", "B. credit"],
                answer="A",
                question_type="multiple-choice",
            )
        ],
    )
    touch(root / "Art/validation_Art_Theory_3.mp4")
    touch(root / "Science/validation_Math_12.mp4")
    touch(root / "Business/validation_Accounting_5.mp4")
    return root


def lvbench(root: Path) -> Path:
    videos = [
        dict(
            key="yt_first",
            type="cartoon",
            video_info=dict(duration_minutes=60.5, fps=30.0, resolution=dict(width=1280, height=720)),
            qa=[
                dict(
                    uid=101,
                    question="What is the cat holding?\n(A) A ball\n(B) A fish\n(C) A hat\n(D) Nothing",
                    answer="B",
                    question_type=["entity recognition"],
                    time_reference="00:15-00:19",
                ),
                dict(
                    uid=102,
                    question="When does it rain?\n(A) start\n(B) middle\n(C) end\n(D) never",
                    answer="D",
                    question_type=["temporal grounding"],
                    time_reference="",
                ),
            ],
        ),
        dict(
            key="yt_second",
            video_info=dict(duration_minutes=70.0, fps=25.0),
            qa=[
                dict(
                    uid=201, question="Who wins?\n(A) red\n(B) blue", answer="A", question_type=["reasoning"]
                )
            ],
        ),
    ]
    path = root / "data/video_info.meta.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(json.dumps(v) for v in videos) + "\n")
    touch(root / "videos/yt_first.mp4")
    # the official video2dataset download: videos/<shard>/<n>.mp4 plus the shard's url/key table
    write_parquet(
        root / "videos/00000.parquet",
        [dict(url="https://www.youtube.com/watch?v=yt_second", key="00000001", status="success")],
    )
    touch(root / "videos/00000/00000001.mp4")
    return root


def charades_sta(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "charades_sta_test.txt").write_text(
        "3MSZA 24.3 30.4##person turn a light on.\n\nAO8RW 0.0 6.9##a person is putting a book on a shelf.\n"
    )
    write_csv(root / "Charades_v1_test.csv", [dict(id="3MSZA", subject="x", length="31.2")])
    touch(root / "Charades_v1_480/3MSZA.mp4")
    touch(root / "Charades_v1_480/AO8RW.mp4")
    return root


def activitynet(root: Path) -> Path:
    write_json(
        root / "val_2.json",
        {
            "v_uqiMw7tQ1Cc": dict(
                duration=55.15,
                timestamps=[[0.28, 55.15], [13.79, 54.32]],
                sentences=["A weight lifting tutorial is given.", " The coach helps the guy."],
            ),
            "v_bXdq2zI1Ms0": dict(duration=73.1, timestamps=[[30.0, 10.0]], sentences=["Three men play."]),
        },
    )
    touch(root / "uqiMw7tQ1Cc.mp4")  # without the "v_" prefix
    touch(root / "videos/v_bXdq2zI1Ms0.mkv")
    return root


def nextgqa(root: Path) -> Path:
    header = dict(video_id="", frame_count="", width="", height="", question="", answer="", qid="", type="")
    opts = ["clap proudly", "the lady sitting down", "lay on floor", "just picked it up", "crawl"]
    rows = [
        {
            **header,
            "video_id": "2574374895",
            "frame_count": "719",
            "width": "320",
            "height": "240",
            "question": "what did the baby do after throwing the green cup away",
            "answer": "lay on floor",
            "qid": "8",
            "type": "TN",
            **{f"a{k}": o for k, o in enumerate(opts)},
        },
        {
            **header,
            "video_id": "2574374895",
            "frame_count": "719",
            "question": "why did the baby clap?",
            "answer": "0",  # an option index, as in NExT-QA
            "qid": "3",
            "type": "CW",
            **{f"a{k}": o for k, o in enumerate(opts)},
        },
    ]
    write_csv(root / "test.csv", rows)
    write_json(
        root / "gsub_test.json",
        {
            "2574374895": dict(
                duration=24.0, location={"8": [[20.1, 23.9]], "3": [[1.2, 5.8], [12.1, 17.1]]}, fps=29.97
            )
        },
    )
    write_json(root / "map_vid_vidorID.json", {"2574374895": "1019/2574374895"})
    touch(root / "NExTVideo/1019/2574374895.mp4")
    return root


def chartqa(root: Path) -> Path:
    write_json(
        root / "test/test_human.json",
        [dict(imgname="41699051005347.png", query="What is the peak value?", label="12")],
    )
    write_json(
        root / "test/test_augmented.json", [dict(imgname="two_col_1.png", query="Is it rising?", label="Yes")]
    )
    for name in ("41699051005347.png", "two_col_1.png"):
        (root / "test/png").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "test/png" / name)
    return root


FIXTURES = {
    "videomme": videomme,
    "longvideobench": longvideobench,
    "mlvu": mlvu,
    "mvbench": mvbench,
    "videommmu": videommmu,
    "lvbench": lvbench,
    "charades_sta": charades_sta,
    "activitynet_captions": activitynet,
    "nextgqa": nextgqa,
    "chartqa": chartqa,
}


def load(name: str, tmp_path: Path, **kw) -> tuple[list[dict], Path]:
    root = FIXTURES[name](tmp_path / name)
    return check_table(load_real_benchmark(name, root, **kw), root), root


# ---------------------------------------------------------------------------------------------------------
# Rows


def test_prompt_helpers():
    assert mc_prompt(" Why? ", ["a", "b"]) == f"Why?\nA. a\nB. b\n{MC_INSTRUCTION}"
    assert "person turn a light on." in grounding_prompt("person turn a light on.")
    assert set(LOADERS) == set(FIXTURES)


def test_videomme(tmp_path):
    rows, _ = load("videomme", tmp_path)
    options = ["One.", "Two.", "Three.", "Four."]
    assert rows[0] == row(
        "001-1",
        "multiple_choice",
        "data/fFjv93ACGo8.mp4",
        mc_prompt("How many people appear?", options),
        "C",
        "videomme",
        options=options,
    )
    assert [r["answer"] for r in rows] == ["C", "A"]
    assert "\nC. Three.\n" in rows[0]["question"]


def test_longvideobench(tmp_path):
    rows, root = load("longvideobench", tmp_path)
    assert rows == [
        row(
            "86CxyhFV9MI_0",
            "multiple_choice",
            "videos/86CxyhFV9MI.mp4",
            mc_prompt("Which subtitle appears with the red car?", ["hello", "bye", "stop"]),
            "B",
            "longvideobench",
            options=["hello", "bye", "stop"],
            duration_s=512.5,
        )
    ]
    test = load_real_benchmark("LongVideoBench", root, split="test").to_list()
    assert test[0]["answer"] == "" and test[0]["options"] == ["a", "b"]  # no ground truth in the test file


def test_mlvu(tmp_path):
    rows, root = load("mlvu", tmp_path)
    assert [r["id"] for r in rows] == ["1_plotQA_0", "2_needle_0"]  # 9_summary (generation) skipped
    assert rows[0] == row(
        "1_plotQA_0",
        "multiple_choice",
        "video/1_plotQA/movie101_66.mp4",
        mc_prompt("What color is the main character's shirt?", ["Yellow", "Red", "Green", "Blue"]),
        "C",
        "mlvu",
        options=["Yellow", "Red", "Green", "Blue"],
        duration_s=246.0,
    )
    assert rows[1]["media_path"] == "video/needle/needle_32.mp4" and rows[1]["answer"] == "A"
    assert load_real_benchmark("mlvu", root, split="needle")["id"] == ["2_needle_0"]


def test_mvbench(tmp_path):
    rows, root = load("mvbench", tmp_path)
    assert len(rows) == len(MVBENCH_VIDEO_DIRS) == 20
    by_id = {r["id"]: r for r in rows}
    assert by_id["action_antonym_0"] == row(
        "action_antonym_0",
        "multiple_choice",
        "video/ssv2_video/action_antonym_0.mp4",
        mc_prompt("action_antonym question?", ["yes", "no", "maybe"]),
        "B",
        "mvbench",
        options=["yes", "no", "maybe"],
    )
    assert by_id["action_sequence_0"]["media_path"] == "video/star/Charades_v1_480/action_sequence_0.mp4"
    assert by_id["episodic_reasoning_0"]["media_path"] == "video/tvqa/frames_fps3_hq/episodic_reasoning_clip"
    assert load_real_benchmark("mvbench", root, split="fine_grained_pose")["media_path"] == [
        "video/nturgbd/fine_grained_pose_0.mp4"
    ]


def test_videommmu(tmp_path):
    rows, root = load("videommmu", tmp_path)
    assert [r["task"] for r in rows] == ["multiple_choice", "open_qa", "multiple_choice"]
    assert rows[0] == row(
        "validation_Art_Theory_3",
        "multiple_choice",
        "Art/validation_Art_Theory_3.mp4",
        mc_prompt("Which painting is shown?", ["Mona Lisa", "Starry Night", "The Scream"]),
        "B",
        "videommmu",
        options=["Mona Lisa", "Starry Night", "The Scream"],
    )
    assert rows[1] == row(
        "validation_Math_12",
        "open_qa",
        "Science/validation_Math_12.mp4",
        f"What is the value of x?\n{OPEN_INSTRUCTION}",
        "42",
        "videommmu",
    )
    assert rows[2]["options"] == ["debit", "credit"]  # "A. " prefixes dropped
    assert load_real_benchmark("videommmu", root, split="comprehension")["id"] == ["validation_Math_12"]


def test_lvbench(tmp_path):
    rows, _ = load("lvbench", tmp_path)
    options = ["A ball", "A fish", "A hat", "Nothing"]
    assert rows[0] == row(
        "101",
        "multiple_choice",
        "videos/yt_first.mp4",
        mc_prompt("What is the cat holding?", options),
        "B",
        "lvbench",
        options=options,
        fps=30.0,
        duration_s=3630.0,
    )
    assert [r["answer"] for r in rows] == ["B", "D", "A"]
    assert rows[2]["media_path"] == "videos/00000/00000001.mp4" and rows[2]["options"] == ["red", "blue"]


def test_charades_sta(tmp_path):
    rows, _ = load("charades_sta", tmp_path)
    assert rows[0] == row(
        "3MSZA_1",
        "grounding",
        "Charades_v1_480/3MSZA.mp4",
        grounding_prompt("person turn a light on."),
        "24.3-30.4",
        "charades_sta",
        duration_s=31.2,
        answer_span=[24.3, 30.4],
    )
    assert (
        rows[1]["id"] == "AO8RW_3" and rows[1]["answer_span"] == [0.0, 6.9] and rows[1]["duration_s"] == 0.0
    )
    assert score("grounding", "24.3 to 30.4", rows[0]["answer"], [], rows[0]["answer_span"]) == 1.0


def test_activitynet_captions(tmp_path):
    rows, _ = load("activitynet_captions", tmp_path)
    assert rows[1] == row(
        "v_uqiMw7tQ1Cc_1",
        "grounding",
        "uqiMw7tQ1Cc.mp4",
        grounding_prompt("The coach helps the guy."),
        "13.8-54.3",
        "activitynet_captions",
        duration_s=55.15,
        answer_span=[13.79, 54.32],
    )
    assert [r["id"] for r in rows] == ["v_uqiMw7tQ1Cc_0", "v_uqiMw7tQ1Cc_1", "v_bXdq2zI1Ms0_0"]
    assert rows[2]["media_path"] == "videos/v_bXdq2zI1Ms0.mkv" and rows[2]["answer_span"] == [10.0, 30.0]


def test_nextgqa(tmp_path):
    rows, _ = load("nextgqa", tmp_path)
    options = ["clap proudly", "the lady sitting down", "lay on floor", "just picked it up", "crawl"]
    assert rows[0] == row(
        "2574374895_8",
        "grounded_qa",
        "NExTVideo/1019/2574374895.mp4",
        mc_prompt("what did the baby do after throwing the green cup away?", options),
        "C",
        "nextgqa",
        options=options,
        fps=29.97,
        num_frames=719,
        duration_s=24.0,
        answer_span=[20.1, 23.9],
    )
    assert rows[1]["answer"] == "A" and rows[1]["answer_span"] == [1.2, 17.1]  # hull of the two segments
    assert rows[1]["question"].startswith("why did the baby clap?\n")


def test_chartqa(tmp_path):
    rows, root = load("chartqa", tmp_path)
    assert rows == [
        row(
            "test_human_0",
            "image_qa",
            "test/png/41699051005347.png",
            f"What is the peak value?\n{OPEN_INSTRUCTION}",
            "12",
            "chartqa",
            media_type="image",
            num_frames=1,
        ),
        row(
            "test_augmented_0",
            "image_qa",
            "test/png/two_col_1.png",
            f"Is it rising?\n{OPEN_INSTRUCTION}",
            "Yes",
            "chartqa",
            media_type="image",
            num_frames=1,
        ),
    ]
    assert load_real_benchmark("chartqa", root, split="test_augmented")["id"] == ["test_augmented_0"]


def test_tables_concatenate_with_embedded(tmp_path):
    """Real tables share the embedded schema: they concatenate with an embedded-style table, and an all-empty
    answer_span column is still a list of float64."""
    embedded = Dataset.from_list(
        [asdict(Sample("e0", "grounding", "video", "test/e0.mp4", "q", "1.0-2.0", answer_span=[1.0, 2.0]))]
    )
    real = load_real_benchmark("videomme", videomme(tmp_path / "vm"))
    assert real.features["answer_span"] == List(Value("float64")) and real["answer_span"] == [[], []]
    both = concatenate_datasets([embedded, real, load_real_benchmark("chartqa", chartqa(tmp_path / "cq"))])
    assert len(both) == 5 and both[1]["options"] == ["One.", "Two.", "Three.", "Four."]
    assert load_real_benchmark("Video-MME", tmp_path / "vm", limit=1)["id"] == ["001-1"]


# ---------------------------------------------------------------------------------------------------------
# Errors


MISSING_ANNOTATION = {
    "videomme": "videomme/test-00000-of-00001.parquet",
    "longvideobench": "lvb_val.json",
    "mlvu": "json/*.json",
    "mvbench": "json/action_sequence.json",
    "videommmu": "Perception/test-*.parquet",
    "lvbench": "video_info.meta.jsonl",
    "charades_sta": "charades_sta_test.txt",
    "activitynet_captions": "val_2.json",
    "nextgqa": "test.csv",
    "chartqa": "test/test_human.json",
}


@pytest.mark.parametrize("name", sorted(MISSING_ANNOTATION))
def test_missing_annotation_file(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=MISSING_ANNOTATION[name].replace("*", r"\*")) as err:
        load_real_benchmark(name, tmp_path)
    assert name.split("_")[0] in str(err.value).lower().replace("-", "").replace(" ", "")


def test_bad_name_split_root_limit(tmp_path):
    with pytest.raises(KeyError, match="unknown benchmark 'egoschema'"):
        load_real_benchmark("egoschema", tmp_path)
    with pytest.raises(FileNotFoundError, match="charades_sta: benchmark folder"):
        load_real_benchmark("Charades-STA", tmp_path / "absent")
    root = longvideobench(tmp_path / "lvb")
    with pytest.raises(ValueError, match="LongVideoBench: unknown split 'dev'"):
        load_real_benchmark("longvideobench", root, split="dev")
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_real_benchmark("longvideobench", root, limit=-1)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_or_invalid_fields(tmp_path):
    root = longvideobench(tmp_path / "lvb")
    _edit_json(root / "lvb_val.json", lambda d: d[0].pop("candidates"))
    with pytest.raises(ValueError, match=r"LongVideoBench lvb_val.json row 0: field 'candidates' missing"):
        load_real_benchmark("longvideobench", root)
    _edit_json(root / "lvb_val.json", lambda d: d[0].update(candidates=["a", "b"], correct_choice=2))
    with pytest.raises(ValueError, match=r"row 0: field 'correct_choice' must be an option index, got 2"):
        load_real_benchmark("longvideobench", root)

    root = videomme(tmp_path / "vm")
    path = root / "videomme/test-00000-of-00001.parquet"
    pd.read_parquet(path).drop(columns=["answer"]).to_parquet(path)
    with pytest.raises(
        ValueError, match=r"VideoMME videomme/test-00000-of-00001.parquet row 0: field 'answer'"
    ):
        load_real_benchmark("videomme", root)

    root = mvbench(tmp_path / "mvb")
    _edit_json(root / "json/state_change.json", lambda d: d[0].update(answer="perhaps"))
    with pytest.raises(
        ValueError, match=r"MVBench json/state_change.json row 0: field 'answer' \('perhaps'\)"
    ):
        load_real_benchmark("mvbench", root)

    root = lvbench(tmp_path / "lvbench")
    meta = root / "data/video_info.meta.jsonl"
    meta.write_text(meta.read_text().replace("\\n(A) red\\n(B) blue", " red or blue"))
    with pytest.raises(ValueError, match=r"LVBench data/video_info.meta.jsonl line 2 qa 0: field 'question'"):
        load_real_benchmark("lvbench", root)

    root = charades_sta(tmp_path / "cs")
    (root / "charades_sta_test.txt").write_text("3MSZA 24.3##no end time\n")
    with pytest.raises(
        ValueError, match=r"Charades-STA charades_sta_test.txt line 1: expected 'VIDEO START END"
    ):
        load_real_benchmark("charades_sta", root)

    root = activitynet(tmp_path / "anet")
    _edit_json(root / "val_2.json", lambda d: d["v_bXdq2zI1Ms0"].update(timestamps=[[1.0]]))
    with pytest.raises(ValueError, match=r"val_2.json video v_bXdq2zI1Ms0 field 'timestamps' item 0"):
        load_real_benchmark("activitynet_captions", root)

    root = nextgqa(tmp_path / "ngqa")
    _edit_json(root / "gsub_test.json", lambda d: d["2574374895"]["location"].pop("3"))
    with pytest.raises(
        ValueError, match=r"NExT-GQA gsub_test.json video 2574374895 location: field '3' missing"
    ):
        load_real_benchmark("nextgqa", root)

    root = chartqa(tmp_path / "cq")
    _edit_json(root / "test/test_augmented.json", lambda d: d[0].pop("label"))
    with pytest.raises(ValueError, match=r"ChartQA test/test_augmented.json row 0: field 'label' missing"):
        load_real_benchmark("chartqa", root)


def test_missing_media(tmp_path):
    root = longvideobench(tmp_path / "lvb")
    (root / "videos/86CxyhFV9MI.mp4").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lvb_val.json row 0: media file not found: .*86CxyhFV9MI.mp4"
    ):
        load_real_benchmark("longvideobench", root)
    assert load_real_benchmark("longvideobench", root, check_media=False)["media_path"] == [
        "videos/86CxyhFV9MI.mp4"
    ]

    root = nextgqa(tmp_path / "ngqa")
    (root / "NExTVideo/1019/2574374895.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"NExTVideo/1019/2574374895.mp4.*videos/1019/2574374895.mp4"):
        load_real_benchmark("nextgqa", root)
