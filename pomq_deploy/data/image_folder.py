"""An image folder that never evaluates on images other than the ones it names."""

from timm.data import ImageDataset

from ..errors import DataError


class StrictImageDataset(ImageDataset):
    """timm's ImageDataset, except that an image that cannot be read or decoded stops with one line naming its file.

    timm logs a warning and returns the next sample in its place: top-1 is then computed over the wrong images (one
    counted twice, the broken one not at all) while the command succeeds, the worst error this tool could make."""

    def __getitem__(self, index):
        from PIL import Image

        file, target, *_ = self.reader[index]
        try:
            with Image.open(file) as opened:
                img = opened.convert(self.input_img_mode)  # decodes every pixel: a truncated file fails here
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"{self.filename(index, absolute=True)}: not a readable image ({e})") from None
        finally:
            if hasattr(file, "close"):
                file.close()
        if self.transform is not None:
            img = self.transform(img)
        return img, -1 if target is None else target
