"""A stand-in for pytorch/examples' `imagenet/main.py`, written for streamsynth's drop-in test (not copied from it).

It has that script's structure wherever a data loader is concerned, GPU branches included, so that README.md's
drop-in diff applies to it as it does to the upstream script: the argument parser (a positional data folder, `-a`,
`-j`, `-b`, `--epochs`, `--resume PATH`, `-e/--evaluate`, `--seed`, `--gpu`, `--dummy`, `--world-size`, `--rank`,
`--dist-url`, `--dist-backend`, `--multiprocessing-distributed`); `mp.spawn` of one process per GPU; the process
group; the model moved to its GPU (DDP with device ids, DataParallel, or the CPU) before any loader exists; resume
from a checkpoint's epoch; ImageFolder datasets with PIL transforms (or FakeData under --dummy); a
`DistributedSampler` only when distributed; `shuffle=(train_sampler is None)`; the epoch loop that calls
`train_sampler.set_epoch(epoch)` under `if args.distributed:`; `len(train_loader)` for progress; a checkpoint per
epoch. The lines README.md's diff changes are spelled as upstream spells them.

Two things differ on purpose: --dummy's FakeData is 24 images (upstream: ImageNet's 1.28 M), and the test runs the
GPU branches on the CPU through tests/dropin/fake_cuda (a `sitecustomize` that stands in for CUDA).
"""

import argparse
import os
import random
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.parallel
import torch.optim
import torch.utils.data
import torch.utils.data.distributed
import torchvision.datasets as datasets
import torchvision.models as models
import torchvision.transforms as transforms
from torch.optim.lr_scheduler import StepLR

parser = argparse.ArgumentParser(description='PyTorch ImageNet Training')
parser.add_argument('data', metavar='DIR', nargs='?', default='imagenet')
parser.add_argument('-a', '--arch', metavar='ARCH', default='resnet18')
parser.add_argument('-j', '--workers', default=4, type=int, metavar='N')
parser.add_argument('--epochs', default=90, type=int, metavar='N')
parser.add_argument('--start-epoch', default=0, type=int, metavar='N')
parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N')
parser.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR', dest='lr')
parser.add_argument('--momentum', default=0.9, type=float, metavar='M')
parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float, metavar='W', dest='weight_decay')
parser.add_argument('-p', '--print-freq', default=10, type=int, metavar='N')
parser.add_argument('--resume', default='', type=str, metavar='PATH')
parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true')
parser.add_argument('--world-size', default=-1, type=int)
parser.add_argument('--rank', default=-1, type=int)
parser.add_argument('--dist-url', default='env://', type=str)
parser.add_argument('--dist-backend', default='nccl', type=str)
parser.add_argument('--seed', default=None, type=int)
parser.add_argument('--gpu', default=None, type=int)
parser.add_argument('--no-accel', action='store_true')
parser.add_argument('--multiprocessing-distributed', action='store_true')
parser.add_argument('--dummy', action='store_true', help="use fake data to benchmark")

best_acc1 = 0


def main():
    args = parser.parse_args()
    if args.seed is not None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
    if args.dist_url == "env://" and args.world_size == -1:
        args.world_size = int(os.environ.get("WORLD_SIZE", -1))
    args.distributed = args.world_size > 1 or args.multiprocessing_distributed
    use_accel = not args.no_accel and torch.accelerator.is_available()
    device = torch.accelerator.current_accelerator() if use_accel else torch.device("cpu")
    ngpus_per_node = torch.accelerator.device_count() if device.type == 'cuda' else 1
    if args.multiprocessing_distributed:
        args.world_size = ngpus_per_node * args.world_size
        mp.spawn(main_worker, nprocs=ngpus_per_node, args=(ngpus_per_node, args))
    else:
        main_worker(args.gpu, ngpus_per_node, args)


def main_worker(gpu, ngpus_per_node, args):
    global best_acc1
    args.gpu = gpu
    use_accel = not args.no_accel and torch.accelerator.is_available()
    if use_accel:
        if args.gpu is not None:
            torch.accelerator.set_device_index(args.gpu)
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")

    if args.distributed:
        if args.dist_url == "env://" and args.rank == -1:
            args.rank = int(os.environ["RANK"])
        if args.multiprocessing_distributed:
            args.rank = args.rank * ngpus_per_node + gpu
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank)
    model = models.__dict__[args.arch](num_classes=1000)

    # The model reaches its GPU here, before any DataLoader forks a worker.
    if not use_accel:
        pass
    elif args.distributed:
        if device.type == 'cuda':
            if args.gpu is not None:
                torch.cuda.set_device(args.gpu)
                model.cuda(device)
                args.batch_size = int(args.batch_size / ngpus_per_node)
                args.workers = int((args.workers + ngpus_per_node - 1) / ngpus_per_node)
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu])
            else:
                model.cuda()
                model = torch.nn.parallel.DistributedDataParallel(model)
    elif device.type == 'cuda':
        model = torch.nn.DataParallel(model).cuda()
    else:
        model.to(device)

    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = StepLR(optimizer, step_size=30, gamma=0.1)

    if args.resume:
        if os.path.isfile(args.resume):
            print("=> loading checkpoint '{}'".format(args.resume))
            location = None if args.gpu is None else f'{device.type}:{args.gpu}'
            checkpoint = torch.load(args.resume, map_location=location, weights_only=True)
            args.start_epoch = checkpoint['epoch']
            best_acc1 = checkpoint['best_acc1']
            model.load_state_dict(checkpoint['state_dict'])
            optimizer.load_state_dict(checkpoint['optimizer'])
            scheduler.load_state_dict(checkpoint['scheduler'])
            print("=> loaded checkpoint '{}' (epoch {})".format(args.resume, checkpoint['epoch']))
        else:
            print("=> no checkpoint found at '{}'".format(args.resume))

    # Data loading code
    if args.dummy:
        print("=> Dummy data is used!")
        train_dataset = datasets.FakeData(24, (3, 224, 224), 1000, transforms.ToTensor())
        val_dataset = datasets.FakeData(8, (3, 224, 224), 1000, transforms.ToTensor())
    else:
        traindir = os.path.join(args.data, 'train')
        valdir = os.path.join(args.data, 'val')
        normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                     std=[0.229, 0.224, 0.225])

        train_dataset = datasets.ImageFolder(
            traindir,
            transforms.Compose([
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]))

        val_dataset = datasets.ImageFolder(
            valdir,
            transforms.Compose([
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                normalize,
            ]))

    if args.distributed:
        train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset)
        val_sampler = torch.utils.data.distributed.DistributedSampler(val_dataset, shuffle=False, drop_last=True)
    else:
        train_sampler = None
        val_sampler = None

    train_loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.batch_size, shuffle=(train_sampler is None),
        num_workers=args.workers, pin_memory=True, sampler=train_sampler)

    val_loader = torch.utils.data.DataLoader(
        val_dataset, batch_size=args.batch_size, shuffle=False,
        num_workers=args.workers, pin_memory=True, sampler=val_sampler)

    if args.evaluate:
        validate(val_loader, model, criterion, device, args)
        return

    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            train_sampler.set_epoch(epoch)

        train(train_loader, model, criterion, optimizer, epoch, device, args)
        acc1 = validate(val_loader, model, criterion, device, args)
        scheduler.step()

        best_acc1 = max(acc1, best_acc1)
        if not args.multiprocessing_distributed or args.rank % ngpus_per_node == 0:
            torch.save({'epoch': epoch + 1, 'arch': args.arch, 'state_dict': model.state_dict(),
                        'best_acc1': best_acc1, 'optimizer': optimizer.state_dict(),
                        'scheduler': scheduler.state_dict()}, 'checkpoint.pth.tar')


def train(train_loader, model, criterion, optimizer, epoch, device, args):
    model.train()
    seen, started = 0, time.time()
    for i, (images, target) in enumerate(train_loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        loss = criterion(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += images.size(0)
        if i % args.print_freq == 0:
            print(f"Epoch: [{epoch}][{i + 1}/{len(train_loader)}]\tLoss {loss.item():.4f}")
    print(f"Epoch: [{epoch}] trained on {seen} images in {i + 1} batches ({time.time() - started:.1f} s)")


def validate(val_loader, model, criterion, device, args):
    model.eval()
    correct = torch.zeros(2)
    with torch.no_grad():
        for images, target in val_loader:
            if args.gpu is not None and device.type == 'cuda':
                images = images.cuda(args.gpu, non_blocking=True)
                target = target.cuda(args.gpu, non_blocking=True)
            else:
                images, target = images.to(device), target.to(device)
            correct += torch.tensor([(model(images).argmax(1) == target).sum().item(), len(target)])
    if args.distributed:
        total = correct.to(device)
        dist.all_reduce(total)
        correct = total
    acc1 = 100.0 * correct[0].item() / max(1.0, correct[1].item())
    print(f" * Acc@1 {acc1:.3f} on {int(correct[1].item())} images")
    return acc1


if __name__ == '__main__':
    main()
