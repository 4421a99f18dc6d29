#!/usr/bin/perl
# Instar::PVE::qemu_img_info (libinstar in-process) against PVE's way: /usr/bin/qemu-img info --output=json in
# a child process, its stdout collected (as PVE::Tools::run_command does). Prints the time per call of each and
# the ratio. Usage: perl -Ibindings/perl/blib/lib -Ibindings/perl/blib/arch bench/pve_info.pl [CALLS]
# (make perl-test builds the module first).
use strict;
use warnings;
use File::Temp qw(tempdir);
use IPC::Open3 qw(open3);
use Symbol qw(gensym);
use Time::HiRes qw(time);
use Instar::PVE;

my $calls = shift // 200;
my $dir = tempdir('instar-bench-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $img = "$dir/disk.qcow2";
system('qemu-img', 'create', '-q', '-f', 'qcow2', $img, '32G') == 0 or die "qemu-img create failed\n";
system("qemu-io -c 'write 0 1M' $img >/dev/null") == 0 or die;
system('qemu-img', 'snapshot', '-c', 'snap1', $img) == 0 or die;

sub subprocess_info {
    my ($filename, $fmt) = @_;
    my $err = gensym;
    my $pid = open3(my $in, my $out, $err, '/usr/bin/qemu-img', 'info', '--output=json', '-f', $fmt, '--', $filename);
    close $in;
    local $/;
    my $json = <$out>;
    <$err>;
    waitpid($pid, 0);
    die "qemu-img failed\n" if $?;
    return $json;
}

die "the two differ\n" if subprocess_info($img, 'qcow2') ne Instar::PVE::qemu_img_info($img, 'qcow2', 5);

my $t = time;
subprocess_info($img, 'qcow2') for 1 .. $calls;
my $sub = (time - $t) / $calls;
my $n = $calls * 100;
$t = time;
Instar::PVE::qemu_img_info($img, 'qcow2', 5) for 1 .. $n;
my $lib = (time - $t) / $n;
printf "qemu-img subprocess: %8.1f us/call (%d calls)\n", $sub * 1e6, $calls;
printf "Instar::PVE:         %8.1f us/call (%d calls)\n", $lib * 1e6, $n;
printf "ratio:               %8.1fx\n", $sub / $lib;
