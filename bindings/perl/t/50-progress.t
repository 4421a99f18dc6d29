use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use InstarTest;
use Instar;

my $d = scratch();
qimg_ok('create', '-f', 'qcow2', "$d/p.qcow2", '64M');
qemu_io('-c', 'write -P 1 0 8M', '-c', 'write -P 2 32M 8M', "$d/p.qcow2");

# qemu-img convert -p's percentages, in order, ending at 100
my @seen;
Instar::convert("$d/p.qcow2", "$d/p.raw", progress => sub { push @seen, $_[0]; return 0 });
ok(@seen >= 2, 'convert reported progress (' . scalar(@seen) . ' calls)');
is($seen[-1], 100, 'the last report is 100');
is_deeply([sort { $a <=> $b } @seen], \@seen, 'the reports never go back');
ok(same_image("$d/p.qcow2", "$d/p.raw"), 'the copy is complete');

# the callback runs inside the call, in the caller's dynamic scope (the calling thread's interpreter)
our $scope = 'outside';
my @scopes;
{
    local $scope = 'inside';
    Instar::compare("$d/p.qcow2", "$d/p.raw", progress => sub { push @scopes, $scope; return 0 });
}
ok(@scopes > 0, 'compare reported progress');
is_deeply([grep { $_ ne 'inside' } @scopes], [], 'every report ran within the call, on the calling thread');

# cancellation from the return value: E_CANCELLED, and the target convert created is removed
my $n = 0;
eval { Instar::convert("$d/p.qcow2", "$d/c.raw", progress => sub { return ++$n >= 2 }) };
my $e = $@;
isa_ok($e, 'Instar::Error');
is($e->code, Instar::E_CANCELLED, 'a true return cancels: E_CANCELLED');
ok(!-e "$d/c.raw", 'the cancelled convert left no target');
is($n, 2, 'no report after the one that cancelled');

# cancellation of commit keeps the chain valid
qimg_ok('create', '-f', 'qcow2', '-F', 'qcow2', '-b', "$d/p.qcow2", "$d/top.qcow2");
qemu_io('-c', 'write -P 3 0 16M', "$d/top.qcow2");
eval { Instar::commit("$d/top.qcow2", progress => sub { 1 }) };
is($@->code, Instar::E_CANCELLED, 'commit cancelled');
is((qimg('check', "$d/p.qcow2"))[0], 0, 'the base still checks clean');

# an exception in the callback stops the operation and comes back unchanged
my $obj = bless { why => 'stop' }, 'My::Stop';
eval { Instar::convert("$d/p.qcow2", "$d/d.raw", progress => sub { die $obj }) };
is($@, $obj, 'a die in the callback is rethrown as the same object');
ok(!-e "$d/d.raw", '... and the target is removed');
eval { Instar::dd("$d/p.qcow2", "$d/dd.raw", progress => sub { die "plain text\n" }) };
is($@, "plain text\n", 'a die with a string keeps the string');

# progress must be a code ref
eval { Instar::convert("$d/p.qcow2", "$d/e.raw", progress => 'not code') };
like("$@", qr/code reference/, 'a non-code progress is refused');

# exceptions in callbacks leak nothing: many dying calls leave RSS flat
my $loop = sub {
    for (1 .. 300) {
        eval { Instar::compare("$d/p.qcow2", "$d/p.raw", progress => sub { die { n => $_ } }) };
        die "no exception" if ref($@) ne 'HASH';
    }
};
$loop->();
my $before = rss_kib();
$loop->() for 1 .. 3;
my $after = rss_kib();
cmp_ok($after - $before, '<', 2048, "900 dying callbacks: RSS grew by less than 2 MiB ($before -> $after KiB)");

done_testing;
