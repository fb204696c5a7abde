"""Standard-library corpus and document-level splits (DESIGN.md §7 (b))."""

import sysconfig
from pathlib import Path

import pytest

from moealign.data.corpus import Document, split_documents, stdlib_documents


@pytest.fixture(scope="module")
def documents():
    return stdlib_documents()


def test_stdlib_documents_are_sorted_real_source_without_tests(documents):
    names = [d.name for d in documents]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "os.py" in names and "json/__init__.py" in names
    assert not any(
        part in ("test", "tests", "site-packages") for n in names for part in n.split("/")
    )
    root = Path(sysconfig.get_paths()["stdlib"])
    os_doc = next(d for d in documents if d.name == "os.py")
    assert os_doc.text == (root / "os.py").read_text(encoding="utf-8")


def test_limits_keep_a_prefix(documents):
    assert stdlib_documents(max_documents=7) == documents[:7]
    limited = stdlib_documents(max_bytes=100_000)
    assert limited == documents[: len(limited)]
    assert sum(len(d.text.encode()) for d in limited) <= 100_000
    with pytest.raises(ValueError, match="max_documents=0"):
        stdlib_documents(max_documents=0)


def test_split_is_disjoint_complete_deterministic_and_order_free(documents):
    train, val, test = split_documents(documents, seed=3)
    assert train and val and test
    names = [{d.name for d in s} for s in (train, val, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert names[0] | names[1] | names[2] == {d.name for d in documents}
    assert abs(len(train) / len(documents) - 0.8) < 0.06
    assert split_documents(documents[::-1], seed=3) == (train, val, test)
    assert split_documents(documents, seed=4)[0] != train


def test_split_rejects_bad_fractions_and_duplicate_names():
    docs = [Document("a", "x"), Document("b", "y")]
    with pytest.raises(ValueError, match="fractions"):
        split_documents(docs, 0, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="duplicate names"):
        split_documents([*docs, Document("a", "z")], 0)
