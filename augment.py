"""CIFAR data: reading CIFAR's on-disk format, albumentations augmentation, and the training loader.

    data = load_dataset("cifar10", "./data", download=True)   # uint8 NHWC arrays + class names
    dataset = AugmentedImages(data.train_images, data.train_labels, train_transform(data.mean))
    loader = DataLoader(dataset, batch_sampler=SeededBatchSampler(len(dataset), 512, seed=0), num_workers=4)

Images stay uint8 up to the device (4x fewer bytes than float32 through the workers and the copy), where
`normalize` makes them the model's input. Augmentation is a pure function of (seed, epoch, batch): each
batch brings its own seed and the transform is re-seeded with it. So every DataLoader worker draws its own
stream (albumentations 2.0.8 copies one generator state into every worker, which would otherwise draw the
same augmentations in all), whatever the worker count, and a resumed run draws what an uninterrupted one
would have drawn.
"""
import contextlib
import hashlib
import os
import pickle
import shutil
import signal
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

# albumentations asks PyPI for a newer version on import unless told not to: no network for that.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402 - after the variable above
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

import cam_checks  # noqa: E402
import devices  # noqa: E402
import distributed  # noqa: E402
from cli import UsageError, note, warn  # noqa: E402

# Per-channel statistics of the training images, in [0, 1] (airbench; the often-copied
# CIFAR-10 std (0.2023, 0.1994, 0.2010) is wrong).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class DatasetSpec:
    """A CIFAR dataset's official files: (name, md5) pairs, as torchvision.datasets lists them (a test
    compares), its archive and the folder it extracts to inside --data-dir."""
    title: str
    folder: str
    archive: str
    url: str
    archive_md5: str
    train_files: tuple
    test_files: tuple
    meta_file: tuple
    class_names_key: str
    mean: tuple
    std: tuple


CIFAR10 = DatasetSpec(
    title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    train_files=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                 ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                 ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                 ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                 ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
    test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    class_names_key="label_names", mean=CIFAR10_MEAN, std=CIFAR10_STD)

CIFAR100 = DatasetSpec(
    title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
    class_names_key="fine_label_names", mean=CIFAR100_MEAN, std=CIFAR100_STD)

DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


class DatasetError(Exception):
    """The dataset is missing, cannot be downloaded, or its files are not in CIFAR's format."""


@dataclass
class ImageData:
    """A dataset in memory: uint8 images (N, 32, 32, 3), int64 labels (N,); `official`: every file matched
    the official checksums."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list
    mean: tuple
    std: tuple
    official: bool


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(spec, data_dir):
    """Fetch and extract the archive with torchvision (which checks its md5), or say what to do instead."""
    from torchvision.datasets.utils import download_and_extract_archive  # slow import: only when needed

    manual = (f"download {spec.url} yourself and put {spec.archive} (or its extracted {spec.folder}/ "
              f"folder) in {data_dir}/, then run again")
    created = not os.path.exists(data_dir)
    try:
        download_and_extract_archive(spec.url, data_dir, filename=spec.archive, md5=spec.archive_md5)
    except Exception as error:  # URLError, HTTPError, socket errors, a bad archive: all end the same way
        if created:  # a failed first download leaves no empty (or half-filled) folder behind
            shutil.rmtree(data_dir, ignore_errors=True)
        raise DatasetError(f"could not download {spec.title} ({devices.first_line(error)}); {manual}") from None


def _extract(spec, data_dir):
    """Extract the official archive found in data_dir, after checking its md5."""
    from torchvision.datasets.utils import extract_archive  # slow import: only when needed
    archive = os.path.join(data_dir, spec.archive)
    if _md5(archive) != spec.archive_md5:
        raise DatasetError(f"{archive} is not the official {spec.title} archive (its md5 differs: damaged or "
                           f"incomplete); delete it and download {spec.url} again (or run without --no-download)")
    try:
        extract_archive(archive, data_dir)
    except (OSError, tarfile.TarError) as error:
        raise DatasetError(f"could not extract {archive} into {data_dir}/ ({error}); check the free space and "
                           f"that the folder is writable") from None


def _read_pickle(path, spec):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # CIFAR's pickles were written by Python 2
    except Exception as error:
        raise DatasetError(f"{path} is damaged or truncated (it does not unpickle: {type(error).__name__}); "
                           f"replace that one file from {spec.archive}, or delete {os.path.dirname(path)}/ "
                           f"and let train.py download it again") from None


def _read_batches(folder, files, spec):
    """CIFAR batch files -> uint8 (N, 32, 32, 3) images and int64 labels. Only CIFAR's layout is read: uint8
    rows of 3072 values (1024 red, 1024 green, 1024 blue), or the same as (N, 3, 32, 32); anything else (HWC
    images, floats in [0, 1]) would reshape without error into scrambled pictures."""
    images, labels = [], []
    for name, _ in files:
        path = os.path.join(folder, name)
        entry = _read_pickle(path, spec)
        try:
            data = entry["data"]
            batch_labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"])
            cifar = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] in ((3072,), (3, 32, 32))
            if not cifar:
                found = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise ValueError(f"its 'data' is {found}, not CIFAR's uint8 rows of 3072 (CHW) values, (N, 3072)")
            if batch_labels.ndim != 1 or (batch_labels.size and not np.issubdtype(batch_labels.dtype, np.integer)):
                raise ValueError("its labels are not a list of integers")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DatasetError(f"{path} is not a CIFAR batch ({type(error).__name__}: {error})") from None
        if len(batch_labels) != len(data) or not len(data):
            raise DatasetError(f"{path} holds {len(data)} images and {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # HWC, as albumentations wants
        labels.append(batch_labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load_dataset(name, data_dir, download=True, test_only=False):
    """Load CIFAR-10 or CIFAR-100 from `data_dir`, downloading it first if it is missing and allowed. Files
    that differ from the official ones (a development split) still load, with a warning, so that numbers
    from them are never mistaken for official ones (`official` says which). test_only: the training
    arrays come back empty."""
    spec = DATASETS[name]
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DatasetError(f"--data-dir {data_dir} is a file, not a folder; give the folder that holds (or will "
                           f"hold) {spec.folder}/")
    folder = os.path.join(data_dir, spec.folder)
    train_files = () if test_only else spec.train_files
    needed = train_files + spec.test_files + (spec.meta_file,)
    missing = [n for n, _ in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        archive = os.path.join(data_dir, spec.archive)
        if os.path.isfile(archive) and (not download or _md5(archive) == spec.archive_md5):
            _extract(spec, data_dir)  # put there by hand: no download needed, --no-download or not
        elif not download:
            raise DatasetError(f"{spec.title} not found: {folder}/ lacks {', '.join(missing)}; download "
                               f"{spec.url} into {data_dir}/ (or extract it there)")
        else:
            _download(spec, data_dir)  # also over an incomplete archive (an interrupted download)
    mismatched = [n for n, md5 in needed if _md5(os.path.join(folder, n)) != md5]
    if mismatched:
        warn(f"{folder}/ is not the official {spec.title} ({', '.join(mismatched)} differ from the official "
             f"checksums); loading it anyway, so its accuracies are not official test accuracies")
    train_images, train_labels = (_read_batches(folder, train_files, spec) if train_files else
                                  (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)))
    test_images, test_labels = _read_batches(folder, spec.test_files, spec)
    meta = _read_pickle(os.path.join(folder, spec.meta_file[0]), spec)
    classes = list(meta.get(spec.class_names_key, [])) if isinstance(meta, dict) else []
    labels = np.concatenate([train_labels, test_labels])
    if not classes or labels.max() >= len(classes) or labels.min() < 0:
        raise DatasetError(f"{folder}/ has labels outside its {len(classes)} class names")
    if name == "cifar10" and classes != CIFAR10_CLASSES:
        warn(f"{folder}/ holds other classes than CIFAR-10's ({', '.join(map(str, classes[:4]))}, ...): "
             f"another dataset in CIFAR-10's format; its results are not CIFAR-10's")
    return ImageData(train_images, train_labels, test_images, test_labels, classes,
                     spec.mean, spec.std, official=not mismatched)


def mean_colour(mean):
    """The dataset's mean colour as uint8 RGB: cutout's fill, which normalizes to about zero."""
    return tuple(int(round(255 * m)) for m in mean)


class Cutout(A.ImageOnlyTransform):
    """One `size` x `size` hole filled with `fill`, placed uniformly inside the image (DeVries & Taylor 2017):
    albumentations' CoarseDropout(num_holes_range=(1, 1), ...) at a fraction of its cost, which builds a numpy
    Generator for every image (the whole augmentation took 105 us an image with it, 31 us with this, on a
    2-core EPYC; benchmark.py measures both). Its place comes from the transform's stream, as reseed() sets."""

    def __init__(self, size, fill, p=1.0):
        super().__init__(p=p)
        self.size, self.fill = size, tuple(fill)

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        return {"top": self.py_random.randint(0, max(0, height - self.size)),
                "left": self.py_random.randint(0, max(0, width - self.size))}

    def apply(self, img, top=0, left=0, **params):
        img = img.copy()  # the input may be a view of the dataset's own images
        img[top:top + self.size, left:left + self.size] = self.fill
        return img

    def get_transform_init_args_names(self):
        return ("size", "fill")


def train_transform(mean, cutout=12, pad_crop=4, flip=True, normalize_std=None):
    """uint8 HWC images -> uint8 CHW tensors (normalized later, on the device): reflect-pad by `pad_crop` and
    a random 32x32 crop, horizontal flip, one `cutout` hole of the mean colour; 0 turns a step off. With
    `normalize_std` it normalizes to float32 itself (benchmark.py compares that with the device doing it)."""
    steps = []
    if pad_crop:
        steps += [A.Pad(pad_crop, border_mode=cv2.BORDER_REFLECT_101), A.RandomCrop(32, 32)]
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if cutout:
        steps.append(Cutout(cutout, fill=mean_colour(mean)))
    if normalize_std is not None:
        steps.append(A.Normalize(mean=mean, std=normalize_std, max_pixel_value=255.0))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def reseed(transform, seed):
    """Give the Compose and each of its transforms an independent stream derived from `seed`:
    Compose.set_random_seed hands them all the same seed, which would tie the flip to the crop position."""
    children = list(getattr(transform, "transforms", []))
    seeds = np.random.SeedSequence(seed).generate_state(len(children) + 1)
    transform.set_random_seed(int(seeds[0]))  # this seeds the children too, all alike: re-seed them below
    for child, child_seed in zip(children, seeds[1:]):
        child.set_random_seed(int(child_seed))


class AugmentedImages(torch.utils.data.Dataset):
    """uint8 HWC images through an albumentations transform. Fetched in batches from a SeededBatchSampler
    (DataLoader calls __getitems__ with its `(seed, indices)`), it re-seeds first. shared=True keeps the
    arrays in shared memory, for workers started by spawn or forkserver: each would otherwise unpickle a
    copy of its own (150 MB of CIFAR a worker); a shared tensor travels to them as a handle."""

    def __init__(self, images, labels, transform, shared=False):
        if shared:
            images, labels = (torch.from_numpy(np.ascontiguousarray(a)).share_memory_() for a in (images, labels))
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        image = image.numpy() if isinstance(image, torch.Tensor) else image
        return self.transform(image=image)["image"], int(self.labels[index])

    def __getitems__(self, seeded_batch):
        batch_seed, indices = seeded_batch
        reseed(self.transform, batch_seed)
        return [self[i] for i in indices]


class SeededBatchSampler:
    """Shuffled batches of indices, each with its own augmentation seed, both fixed by (seed, epoch, batch);
    call set_epoch before each epoch. Under torchrun each of `world_size` processes takes its `rank`'s share
    of every global batch, with a seed of its own (else every rank would draw the same crops)."""

    def __init__(self, size, batch_size, seed, shuffle=True, drop_last=True, rank=0, world_size=1):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        # Dropping a ragged last batch keeps batch statistics sound and shapes static (torch.compile),
        # unless there would be no batch at all.
        self.drop_last = drop_last and size >= batch_size
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.size) if self.shuffle
                 else np.arange(self.size))
        for batch in range(len(self)):
            indices = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            # This rank's consecutive share; a single process keeps the seed it always had.
            mine = np.array_split(indices, self.world_size)[self.rank]
            yield [self.seed, self.epoch, batch] + ([self.rank] if self.world_size > 1 else []), mine.tolist()


def balanced_subset(labels, count, seed=0):
    """Sorted indices of `count` samples spread as evenly over the classes as the labels allow; the same
    labels give the same subset (a fixed seed), so every epoch evaluates the same images."""
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # the sample's place among its class, in shuffled order
    for label in np.unique(labels):
        members = order[labels[order] == label]
        rank[members] = np.arange(len(members))
    return np.sort(np.lexsort((labels, rank))[:count])


def split_data(data, args):
    """Apply --train-subset, --val-split and --plant-shortcut (to the training images alone); return (train,
    val) as (images, labels) pairs, val may be None."""
    images, labels = data.train_images, data.train_labels
    if args.train_subset > len(images):
        note(f"--train-subset {args.train_subset} asked for, but the dataset has {len(images)} training images: "
             f"training on all of them")
    if args.train_subset:
        images, labels = images[:args.train_subset], labels[:args.train_subset]
    if args.val_split >= len(images):
        raise UsageError(f"--val-split {args.val_split} leaves no training images (of {len(images)})")
    if args.batch_size > len(images) - args.val_split:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(images) - args.val_split} training "
                         f"images; give at most {len(images) - args.val_split}")
    val = None
    if args.val_split:
        order = np.random.default_rng(args.seed).permutation(len(images))
        train, held_out = np.sort(order[args.val_split:]), np.sort(order[:args.val_split])
        images, labels, val = images[train], labels[train], (images[held_out], labels[held_out])
    shortcut = cam_checks.planted_shortcut(args.plant_shortcut, data.classes)
    if shortcut is not None:
        images = cam_checks.plant_shortcut(images, labels, shortcut["class"], args.seed)
    return (images, labels), val


def test_data(data, args):
    """The test images to evaluate: all, or --test-subset of them, class-balanced and the same every epoch."""
    if not args.test_subset:
        return data.test_images, data.test_labels
    if args.test_subset >= len(data.test_labels):
        note(f"--test-subset {args.test_subset} asked for, but the dataset has {len(data.test_labels)} test "
             f"images: evaluating on all of them")
        return data.test_images, data.test_labels
    chosen = balanced_subset(data.test_labels, args.test_subset)
    return data.test_images[chosen], data.test_labels[chosen]


def as_tensors(images, labels, device):
    """Evaluation images and labels on the device: uint8 (N, 3, H, W) and int64 (N,)."""
    return to_tensor(images).to(device), torch.from_numpy(labels).to(device)


def to_tensor(images):
    """uint8 (N, H, W, 3) array -> uint8 (N, 3, H, W) tensor view: evaluation's whole transform."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def normalize(images, mean, std):
    """uint8 (B, 3, H, W) -> float32 normalized, channels_last if the input was; mean and std: 3 values in
    [0, 1], as sequences or as tensors on the images' device."""
    mean = torch.as_tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.as_tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


# ----------------------------------------------------------------------------- the training loader

def default_workers(processes_on_this_machine=1):
    """The cores this process may use, less one for itself (it feeds the GPU), at most 16; under torchrun the
    machine's processes share them. Augmentation costs about 30 us an image on a core (benchmark.py, on a
    2-core EPYC): 40,000 images/s take about two workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // processes_on_this_machine - 1))


def ignore_stop_signals_in_worker(_worker_id):
    # Ctrl-C (and a cluster's SIGTERM) reach the whole process group: only the main process decides how
    # to stop; workers end with it (DataLoader shuts them down, and they exit when their parent is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(loader):
    """End the loader's workers now: an error's traceback keeps the loader's iterator alive, and the workers
    ignore SIGTERM, so multiprocessing's exit handler (terminate, then join) would wait forever for them."""
    iterator = getattr(loader, "_iterator", None)
    with contextlib.suppress(Exception):
        iterator._shutdown_workers()


def make_train_loader(images, labels, args, mean, device, workers, normalize_std=None, start_method=None,
                      world=distributed.World()):
    """The augmenting DataLoader and its sampler: this rank's share of each global batch of --batch-size
    images. start_method: how workers start (default: the platform's, devices.worker_start_method)."""
    start_method = start_method or devices.worker_start_method()
    shared = workers > 0 and devices.dataset_in_shared_memory(start_method)
    # /dev/shm's free bytes, before the dataset moves there, shared by the processes of this machine.
    pixel_bytes = 1 if normalize_std is None else 4  # uint8, or float32 normalized in the workers
    batch_bytes = world.per_rank(args.batch_size) * (images[0].size * pixel_bytes + labels[:1].nbytes)
    free = devices.free_shared_memory()
    prefetch = devices.fit_prefetch(None if free is None else free // world.local_size, workers, batch_bytes,
                                    dataset_bytes=images.nbytes + labels.nbytes if shared else 0)
    dataset = AugmentedImages(images, labels, train_transform(
        mean, cutout=args.cutout, pad_crop=args.pad_crop, flip=args.flip, normalize_std=normalize_std),
        shared=shared)
    sampler = SeededBatchSampler(len(dataset), args.batch_size, seed=args.seed, rank=world.rank,
                                 world_size=world.size)
    if 0 < prefetch < 4 and workers:
        note(f"/dev/shm is small: each DataLoader worker prepares {prefetch} batch(es) ahead instead of 4")
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=devices.pin_memory(device.type),
        persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
        multiprocessing_context=start_method if workers > 0 else None)
    return loader, sampler
