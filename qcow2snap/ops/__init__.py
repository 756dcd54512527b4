"""Operations on images (layer 4): inspection, extraction, VM-state forensics,
editing through the crash-safe transaction, check, salvage and repair.

See docs/design.md for which module owns what."""
