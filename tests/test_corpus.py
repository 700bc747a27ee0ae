"""Reading a corpus: directories and CSV / JSONL / JSON / Parquet tables, and the problems refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualfocus.pipeline.corpus import VIDEO_EXTENSIONS, CorpusError, read_corpus
from dualfocus.pipeline.qa import IdMatcher


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_directory_is_scanned_recursively_with_ids_relative_to_it(tmp_path):
    touch(tmp_path / "b.mp4")
    touch(tmp_path / "sub" / "a.MKV")
    touch(tmp_path / "tgif" / "tumblr_x1.gif")  # TGIF-QA ships GIFs
    touch(tmp_path / "notes.txt")
    rows = read_corpus(tmp_path)
    assert [r.video_id for r in rows] == ["b", "sub/a", "tgif/tumblr_x1"]
    assert [Path(r.path) for r in rows] == [tmp_path / "b.mp4", tmp_path / "sub" / "a.MKV",
                                           tmp_path / "tgif" / "tumblr_x1.gif"]


def test_qa_names_match_ids_with_every_extension_the_corpus_reads():
    match = IdMatcher(["tumblr_x1", "clip", "v_act"])
    for ext in sorted(VIDEO_EXTENSIONS):
        assert match(f"clip{ext}") == "clip", ext
        assert match(f"clip{ext.upper()}") == "clip", ext
    assert match("tumblr_x1.gif") == "tumblr_x1" and match("act.mp4") == "v_act"
    assert match("clip.txt") is None


def test_paths_are_absolute_even_for_a_relative_corpus(tmp_path, monkeypatch):
    touch(tmp_path / "videos" / "a.mp4")
    (tmp_path / "list.csv").write_text("video_id,path\nx,videos/a.mp4\n")
    monkeypatch.chdir(tmp_path)
    for source in ("videos", "list.csv"):
        (row,) = read_corpus(source)
        assert Path(row.path).is_absolute() and Path(row.path) == tmp_path / "videos" / "a.mp4"


def test_tables_resolve_relative_paths_against_the_table_and_keep_ids_verbatim(tmp_path):
    touch(tmp_path / "v" / "a.mp4")
    ids = ["a/b.c d", "007"]
    (tmp_path / "c.csv").write_text("\ufeffvideo_id,path\n" + "".join(f"{i},v/a.mp4\n" for i in ids))  # with a BOM
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"video_id": i, "path": "v/a.mp4"}) + "\n\n" for i in ids))
    (tmp_path / "c.json").write_text(json.dumps([{"video_id": i, "path": "v/a.mp4"} for i in ids], indent=1))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"video_id": ids, "path": ["v/a.mp4"] * 2}), tmp_path / "c.parquet")
    for name in ("c.csv", "c.jsonl", "c.json", "c.parquet"):
        rows = read_corpus(tmp_path / name)
        assert [r.video_id for r in rows] == ids, name
        assert all(Path(r.path) == tmp_path / "v" / "a.mp4" for r in rows), name


def test_a_missing_video_file_is_not_a_corpus_error(tmp_path):
    (tmp_path / "c.csv").write_text("video_id,path\nghost,/nowhere/ghost.mp4\n")
    assert [r.video_id for r in read_corpus(tmp_path / "c.csv")] == ["ghost"]


def test_duplicate_ids_are_refused_naming_them(tmp_path):
    (tmp_path / "c.csv").write_text("video_id,path\nx,a.mp4\ny,b.mp4\nx,c.mp4\nz,d.mp4\nz,e.mp4\n")
    with pytest.raises(CorpusError, match=r"duplicate video_id values: 'x', 'z'"):
        read_corpus(tmp_path / "c.csv")


def test_same_stem_with_two_extensions_is_a_duplicate(tmp_path):
    touch(tmp_path / "clip.mp4")
    touch(tmp_path / "clip.webm")
    with pytest.raises(CorpusError, match="'clip'"):
        read_corpus(tmp_path)


@pytest.mark.parametrize("kind", ["empty_dir", "dir_without_videos", "header_only_csv", "blank_jsonl"])
def test_a_corpus_without_videos_is_a_clear_error(tmp_path, kind):
    source = {"empty_dir": tmp_path / "d", "dir_without_videos": tmp_path / "d",
              "header_only_csv": tmp_path / "c.csv", "blank_jsonl": tmp_path / "c.jsonl"}[kind]
    if kind in ("empty_dir", "dir_without_videos"):
        source.mkdir()
        if kind == "dir_without_videos":
            touch(source / "readme.txt")
    elif kind == "header_only_csv":
        source.write_text("video_id,path\n")
    else:
        source.write_text("\n\n")
    message = f"{source} is empty" if kind == "blank_jsonl" else f"no videos found in {source}"
    with pytest.raises(CorpusError, match=message):
        read_corpus(source)


def test_unusable_sources_name_the_path(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "c.txt").write_text("a.mp4\n")
    with pytest.raises(CorpusError, match="c.txt: a corpus is a directory"):
        read_corpus(tmp_path / "c.txt")
    (tmp_path / "c.csv").write_text("id,file\n1,a.mp4\n")
    with pytest.raises(CorpusError, match="row 1 has no video_id or path"):
        read_corpus(tmp_path / "c.csv")
    (tmp_path / "c.jsonl").write_text('{"video_id": "a", "path": "a.mp4"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl: malformed JSON at line 2, column 2"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "c.jsonl").write_text('{"video_id": "a", "path": "a.mp4"}\n\n{"video_id": "b"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl: line 3 has no path"):
        read_corpus(tmp_path / "c.jsonl")
    (tmp_path / "c.json").write_text('[{"video_id": "a", "path": "a.mp4"}, ["b", "b.mp4"]]')
    with pytest.raises(CorpusError, match=r"c\.json: record 2 is not a JSON object"):
        read_corpus(tmp_path / "c.json")
    (tmp_path / "latin.csv").write_bytes("video_id,path\ncaf\u00e9,a.mp4\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.csv is not UTF-8 text"):
        read_corpus(tmp_path / "latin.csv")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CorpusError, match=r"c\.parquet: not a readable Parquet file"):
        read_corpus(tmp_path / "c.parquet")
