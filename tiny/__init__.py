"""The tiny preset: its data sample (BBC News and Lee STS from PyPI packages, in the released
layout) and the offline evaluation suite built on it."""
