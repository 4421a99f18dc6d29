use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;
use JSON::PP;
use POSIX ();

my $d = scratch();

# images made by qemu-img
qimg_ok('create', '-f', 'raw', "$d/r.raw", '3M');
qimg_ok('create', '-f', 'qcow2', "$d/base.qcow2", '64M');
qemu_io('-c', 'write -P 7 0 1M', "$d/base.qcow2");
qimg_ok('snapshot', '-c', 'snap one', "$d/base.qcow2");
qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/base.qcow2", "$d/top.qcow2");
qimg_ok('bitmap', '--add', "$d/top.qcow2", 'b0');
qimg_ok('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k,compat=1.1,lazy_refcounts=on',
    "$d/ext.qcow2", '1G');
qimg_ok('create', '-f', 'vmdk', "$d/v.vmdk", '16M');
qimg_ok('create', '-f', 'qcow2', '-o', 'cluster_size=2M', "$d/huge.qcow2", '9007199254741504');    # 2**53 + 512

for my $img (qw(r.raw base.qcow2 top.qcow2 ext.qcow2 huge.qcow2)) {
    my $path = "$d/$img";
    next if !-e $path;
    my $q = qimg_json('info', '--output=json', $path);
    is_deeply(Instar::info($path), $q, "info($img) = qemu-img info --output=json");
    my ($rc, $qtext) = qimg('info', '--output=json', $path);
    is(Instar::info_json($path), $qtext, "info_json($img) is qemu-img's text");
    ($rc, $qtext) = qimg('info', $path);
    is(Instar::info_human($path), $qtext, "info_human($img) is qemu-img's text");
}

# with a format and the backing chain
my $qc = qimg_json('info', '--output=json', '-f', 'qcow2', '--backing-chain', "$d/top.qcow2");
is_deeply(Instar::info("$d/top.qcow2", format => 'qcow2', backing_chain => 1), $qc, 'info --backing-chain');
my (undef, $qct) = qimg('info', '--output=json', '--backing-chain', "$d/top.qcow2");
is(Instar::info_json("$d/top.qcow2", { backing_chain => 1 }), $qct, 'info_json with a hash reference of options');

# a non-ASCII name: JSON text as qemu-img's bytes, the hash as decode_json's characters
{
    my $name = "$d/d\xc3\xa4t\xc3\xa9.qcow2";    # UTF-8 bytes
    qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/base.qcow2", $name);
    my (undef, $qtext) = qimg('info', '--output=json', $name);
    my $text = Instar::info_json($name);
    ok(!utf8::is_utf8($text), 'info_json returns bytes');
    is($text, $qtext, 'info_json of a non-ASCII name: qemu-img\'s bytes');
    is_deeply(Instar::info($name), decode_json($qtext), 'info of a non-ASCII name = decode_json of qemu-img\'s');
    utf8::decode(my $chars = $name);
    is_deeply(Instar::info($chars), decode_json($qtext), '... also when the name is given as characters');
}

# sizes are integers, never floating point
my $huge = Instar::info("$d/huge.qcow2");
ok(is_int_sv($huge->{'virtual-size'}), 'virtual-size is an IV');
is($huge->{'virtual-size'}, qimg_json('info', '--output=json', "$d/huge.qcow2")->{'virtual-size'},
    'a size above 2**53 is exact');
is($huge->{'virtual-size'} - 9007199254740992, 512, 'integer arithmetic on it is exact');
my $img = Instar::Image->open("$d/huge.qcow2");
ok(is_int_sv(my $sz = $img->size), 'Image->size is an IV/UV');
is($sz, $huge->{'virtual-size'}, 'Image->size = virtual-size');
$img->close;

# errors: an Instar::Error with code, errno and qemu-img's message
my ($rc, undef, $qerr) = qimg('info', "$d/missing.qcow2");
eval { Instar::info("$d/missing.qcow2") };
my $e = $@;
isa_ok($e, 'Instar::Error');
is($e->code, Instar::E_NOT_FOUND, 'missing file: E_NOT_FOUND');
is($e->errno, POSIX::ENOENT, 'missing file: errno ENOENT');
is("qemu-img: $e\n", $qerr, 'stringifies to qemu-img\'s message');
is($e->message, "$e", 'message = string form');

($rc, undef, $qerr) = qimg('info', '-f', 'qcow2', "$d/r.raw");
eval { Instar::info("$d/r.raw", format => 'qcow2') };
is("qemu-img: $@\n", $qerr, 'wrong format: qemu-img\'s message');
ok($@->code < 0, 'wrong format: a negative INSTAR_E_* code');

eval { Instar::info("$d/r.raw", 'odd') };
like($@, qr/hash reference/, 'a single non-hash option is refused');
is($@->code, Instar::E_INVALID, '... with E_INVALID');

done_testing;
