"""Datasets: one LesionDataModule base (base.py) and a small module per on-disk layout.

    dataset=synthetic   SyntheticDataModule   generated lesions, DermMel layout, cached under root
    dataset=dermmel     DermMelDataModule     DermMel/{train_sep,valid,test}/{Melanoma,NotMelanoma}
    dataset=ham10000    HAM10000DataModule    HAM10000_metadata.csv + HAM10000_images_part_{1,2}/
    dataset=ph2         PH2DataModule         PH2_dataset.txt + official or flat image folders
    dataset=isic        ISICDataModule        ISIC challenge downloads 2016-2020 (isic_years.py reads each)

Shared pieces: io.py (load_rgb, find_images, ImageReadError), transforms.py (albumentations
pipelines), splits.py (lesion-grouped stratified splits, k-fold), samplers.py (class-balanced
DDP sampler), cache.py (pre-resized images), check.py (list unreadable images), overlap.py (the same ISIC
image in two datasets' train and held-out splits).
"""
