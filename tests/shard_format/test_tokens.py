import numpy as np

from shard_format import token_dtype


def test_uint16_while_every_id_fits():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(250_000) == np.uint32
