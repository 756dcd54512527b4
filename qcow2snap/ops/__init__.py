"""Operations on images (layer 4): extraction; later editing, check and repair."""
