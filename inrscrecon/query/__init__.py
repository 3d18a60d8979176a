"""query stage: ``predict`` / ``predict_anndata`` (predict.py), chunked files (predict_stream.py), ``impute_sections``
(impute.py), out-of-domain checks (domain_check.py), and rendering: ``render`` (render.py) over a ``GridSpec``
(grid.py) masked to the tissue (tissue.py), with domains (domains.py), OME-Zarr (writers.py) and PNG views
(figures.py); ``inrscrecon render`` is render_command.py."""
