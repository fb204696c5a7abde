"""Studies: ablations, reading results back, transfer, reports, plots, documents and the demo."""
