"""Coverage-guided fuzzing of the SIP parsers: targets, seed corpus, atheris runner.

``targets`` holds the fuzz targets as plain functions of bytes; ``seeds``
the seed corpus and dictionaries; ``runner`` runs one target under atheris;
``campaign`` starts the runner in a child process and reads its results.
``regressions/<target>/`` keeps every input that once broke a target.
"""
