"""Datasets: one LesionDataModule base and a small module per on-disk layout (see DESIGN.md)."""
