use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;

my $d = scratch();
qimg_ok('create', '-f', 'qcow2', "$d/m.qcow2", '16M');
qemu_io('-c', 'write -P 0x11 0 128k', '-c', 'write -z 1M 64k', '-c', 'write -P 0x22 4M 64k', "$d/m.qcow2");
qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/m.qcow2", "$d/t.qcow2");
qemu_io('-c', 'write -P 0x33 64k 64k', "$d/t.qcow2");

# map: the entries of qemu-img map --output=json
for my $img (qw(m.qcow2 t.qcow2)) {
    my $q = qimg_json('map', '--output=json', "$d/$img");
    my $m = Instar::map("$d/$img");
    delete $_->{filename} for @$m;
    is_deeply($m, $q, "map($img) = qemu-img map --output=json");
}
my $q = qimg_json('map', '--output=json', '--start-offset=1M', '--max-length=4M', "$d/t.qcow2");
my $m = Instar::map("$d/t.qcow2", start_offset => 1 << 20, max_length => 4 << 20);
delete $_->{filename} for @$m;
is_deeply($m, $q, 'map with start_offset and max_length');

# read through the chain: what qemu-io reads
my $img = Instar::Image->open("$d/t.qcow2");
is($img->filename, "$d/t.qcow2", 'filename');
is($img->size, 16 << 20, 'size');
is($img->read(64 << 10, 0), "\x11" x (64 << 10), 'read from the backing file');
is($img->read(64 << 10, 64 << 10), "\x33" x (64 << 10), 'read from the top');
is($img->read(4096, 4 << 20), "\x22" x 4096, 'read deeper');
is($img->read(4096, 8 << 20), "\0" x 4096, 'unallocated reads as zeroes');
is_deeply($img->info, qimg_json('info', '--output=json', '-U', "$d/t.qcow2"), '->info while open');
eval { $img->read(4096, (16 << 20) - 512) };
is($@->code, Instar::E_RANGE, 'a read past the end: E_RANGE');
eval { $img->write('x', 0) };
is($@->code, Instar::E_PERMISSION, 'a write on a read-only handle: E_PERMISSION');
$img->close;
eval { $img->read(1, 0) };
like("$@", qr/closed/, 'a closed handle refuses calls');

# write, write_zeroes, discard, flush: qemu-io reads what was written, qemu-img check is clean
my $w = Instar::Image->open("$d/t.qcow2", read_write => 1);
is($w->write("\x44" x 65536, 2 << 20), 65536, 'write returns the byte count');
$w->write_zeroes(65536, 0, 0);
$w->discard(65536, 4 << 20);
$w->flush;
$w->close;
qemu_io('-c', 'read -P 0x44 2M 64k', '-c', 'read -P 0 0 64k', '-c', 'read -P 0x33 64k 64k', "$d/t.qcow2");
pass('qemu-io reads the written, zeroed and kept ranges');
my ($rc) = qimg('check', "$d/t.qcow2");
is($rc, 0, 'qemu-img check is clean after the writes');

# DESTROY closes (the write lock is released: qemu-img can open it for writing again)
{
    my $h = Instar::Image->open("$d/m.qcow2", read_write => 1);
    my ($rc2) = qimg('resize', "$d/m.qcow2", '+1M');
    isnt($rc2, 0, 'the write lock is held while the handle lives');
}
my ($rc3, undef, $e3) = qimg('resize', "$d/m.qcow2", '+1M');
is($rc3, 0, 'DESTROY released it') or diag $e3;

# errors of open
eval { Instar::Image->open("$d/none.qcow2") };
is($@->code, Instar::E_NOT_FOUND, 'open of a missing file: E_NOT_FOUND');
{
    my $h = Instar::Image->open("$d/m.qcow2", read_write => 1);
    eval { Instar::Image->open("$d/m.qcow2", read_write => 1) };
    my $e = $@;
    is($e->code, Instar::E_LOCKED, 'a second writer: E_LOCKED');
    my (undef, undef, $qerr) = qimg('resize', "$d/m.qcow2", '+1M');
    is("qemu-img: $e\n", $qerr, '... with qemu-img\'s message');
}

# a perl thread started while a handle is open gets no copy of it (no double close)
SKIP: {
    skip 'perl without threads', 2 if !eval { require threads; 1 };
    my $h = Instar::Image->open("$d/m.qcow2");
    my $t = threads->create(sub { return 'thread ran' });
    is($t->join, 'thread ran', 'a thread ran while a handle was open');
    is($h->size, 17 << 20, 'the handle still works in the parent after the thread ended');
    $h->close;
}

done_testing;
