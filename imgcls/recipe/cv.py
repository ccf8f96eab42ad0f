"""``data.cv``: the run trains on K-1 folds of a K-fold split and validates
on the remaining one (``imgcls cv`` writes it into each fold's recipe).

With ``data.cv`` the automatic train/val split (``val_split``) is not used:
the training images (train plus any val rows or ``val/`` folder; ``test`` is
left alone) are dealt into ``folds`` folds, stratified by class and seeded by
``data.split_seed``; fold ``fold`` is the validation split, the others
train. ``fold: all`` trains on every image and validates on none (the final
model of ``imgcls cv --final``). ``group_by`` (a CSV column named in the
header row) or ``group_by_folder`` (a sub-folder level under each class
folder) keeps related images in one fold.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from imgcls.recipe.types import PosInt, Strict


class CVSpec(Strict):
    folds: Annotated[int, Field(strict=True, ge=2)]
    fold: PosInt | Literal["all"]
    group_by: str | None = None  # a CSV column (the header row names it)
    group_by_folder: PosInt | None = None  # 1: the first sub-folder level under a class folder

    @field_validator("group_by")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give a column name (the CSV's header row names its columns)")
        return value

    @model_validator(mode="after")
    def _check(self) -> CVSpec:
        if self.fold != "all" and self.fold > self.folds:
            raise ValueError(f"fold {self.fold} is beyond the {self.folds} folds (folds count from 1)")
        if self.group_by is not None and self.group_by_folder is not None:
            raise ValueError("give one of group_by (a CSV column) and group_by_folder (a folder level)")
        return self
