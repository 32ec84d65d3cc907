"""transformers' "Loading weights" bars stay out of stratalign's output (they filled the logs of embed, search,
classify and serve), and are back on for the caller's own code afterwards."""

from __future__ import annotations


def test_hf_loading_bars_are_off_while_stratalign_loads_and_back_after(tmp_path, capfd) -> None:
    from tiny_models import save_tiny_bert
    from transformers.utils import logging as hf_logging

    from stratalign.encoders import load_encoder

    assert hf_logging.is_progress_bar_enabled()
    load_encoder("hf:" + str(save_tiny_bert(tmp_path / "bert")))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the caller's own from_pretrained keeps its bars
