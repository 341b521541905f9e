"""Codecs: the ``.kvz`` prefix-cache bitstream format and its pure-torch reference encoder/decoder."""
