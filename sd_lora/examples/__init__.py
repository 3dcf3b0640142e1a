"""Example data for the demo, the tests and the tiny base's trainer: shapes.py draws the captioned
shape/style image sets, measures.py reads style and content back from any image (NumPy only).
`datasets/*.py` in the repository are thin scripts over these; see datasets/README.md."""
