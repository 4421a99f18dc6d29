use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;

# Instar::Image->block_status walked over whole images gives the extents of qemu-img map --output=json: data,
# explicit zeroes, holes, ranges of the backing file, and a raw image's holes.
my $d = scratch();
qimg_ok('create', '-f', 'qcow2', "$d/b.qcow2", '8M');
qemu_io('-c', 'write -P 0x11 0 192k', '-c', 'write -z 1M 64k', '-c', 'write -P 0x22 3M 64k', "$d/b.qcow2");
qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/b.qcow2", "$d/t.qcow2");
qemu_io('-c', 'write -P 0x33 64k 64k', '-c', 'write -z 3M 32k', "$d/t.qcow2");
qimg_ok('create', '-f', 'raw', "$d/r.raw", '4M');
qemu_io('-f', 'raw', '-c', 'write -P 0x44 1M 8k', "$d/r.raw");

# The walk, merged as qemu-img map merges neighbours of one status (map's fields from the status bits).
sub walk {
    my ($img) = @_;
    my ($off, $size, @out) = (0, $img->size);
    my $guard = 0;
    while ($off < $size && $guard++ < 100000) {
        my $st = $img->block_status($off, $size - $off);
        die "empty extent at $off" if $st->{length} < 1;
        my %e = (start => $off, length => $st->{length}, present => $st->{allocated}, zero => $st->{zero},
                 data => $st->{data}, depth => $st->{depth});
        my $p = $out[-1];
        if ($p && $p->{start} + $p->{length} == $off
            && !grep { "$p->{$_}" ne "$e{$_}" } qw(present zero data depth)) {
            $p->{length} += $e{length};
        } else {
            push @out, \%e;
        }
        $off += $st->{length};
    }
    return \@out;
}

for my $case (['t.qcow2', 'qcow2'], ['b.qcow2', 'qcow2'], ['r.raw', 'raw']) {
    my ($name, $fmt) = @$case;
    my $q = qimg_json('map', '--output=json', '-f', $fmt, "$d/$name");
    my @want = map {
        my %e = %$_;
        delete @e{qw(offset filename)};
        \%e;
    } @$q;
    my $img = Instar::Image->open("$d/$name", format => $fmt);
    my $got = walk($img);
    is_deeply($got, \@want, "block_status over $name = qemu-img map --output=json");
    $img->close;
}

# the flags word and the booleans agree; the last extent has STATUS_EOF
my $img = Instar::Image->open("$d/t.qcow2");
my $st = $img->block_status(64 << 10, 64 << 10);
is($st->{length}, 64 << 10, 'length of a written cluster');
ok($st->{allocated} && $st->{data} && !$st->{zero}, 'written data: allocated, data');
is($st->{flags} & (Instar::STATUS_ALLOCATED | Instar::STATUS_DATA), Instar::STATUS_ALLOCATED | Instar::STATUS_DATA,
   'flags carry the same bits');
is($st->{depth}, 0, 'decided by the top');
$st = $img->block_status(0, 64 << 10);
is($st->{depth}, 1, 'a range of the backing file: depth 1');
$st = $img->block_status((8 << 20) - 4096, 4096);
ok($st->{eof} && ($st->{flags} & Instar::STATUS_EOF), 'the last extent reaches the end');

# errors: a range past the end, an empty range
eval { $img->block_status(8 << 20, 512) };
is(ref $@ && $@->code, Instar::E_RANGE, 'a range past the end: E_RANGE');
eval { $img->block_status(0, 0) };
is(ref $@ && $@->code, Instar::E_RANGE, 'count 0: E_RANGE');
$img->close;
eval { $img->block_status(0, 512) };
like("$@", qr/closed/, 'a closed handle refuses block_status');

done_testing();
