"""NeMo's /generate dialect (model/serve/nemo_api.py) without a model: end strings become stop conditions."""
from fleetgen.model.serve.nemo_api import nemo_stop
from tests.server_fixtures import EOT


def test_end_strings_become_stop_tokens_or_stop_texts(bpe):
    eos = bpe.eos_id
    stop = nemo_stop([EOT, "\n", "endoftext was not a token"], bpe, eos)
    newline = bpe.encode("\n")
    assert len(newline) == 1
    assert stop.token_ids == {eos, newline[0]}
    assert stop.strings == ("\n", "endoftext was not a token")  # EOT is the end-of-document token itself
    assert nemo_stop([], bpe, eos).token_ids == {eos}  # as in NeMo, end-of-document always ends a sequence
