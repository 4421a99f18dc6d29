package InstarTest;

# Helpers of the Instar test suite: a scratch directory, qemu-img runs, and an emulation of how Proxmox's
# PVE::Tools::run_command runs qemu-img (so a drop-in can be compared with the subprocess path it replaces).

use strict;
use warnings;

use Exporter 'import';
use File::Temp qw(tempdir);
use IPC::Open3 qw(open3);
use JSON::PP ();
use Symbol qw(gensym);
use B ();

our @EXPORT = qw(scratch qimg qimg_ok qimg_json qemu_io run_cmd pve_run capture_stderr is_int_sv same_image
                 rss_kib);

my $dir;
sub scratch { $dir //= tempdir('instar-perl-XXXXXX', TMPDIR => 1, CLEANUP => 1); return $dir; }

# Runs a command without a shell: (exit status, stdout, stderr).
sub run_cmd {
    my (@cmd) = @_;
    my $err = gensym;
    my $pid = open3(my $in, my $out, $err, @cmd);
    close $in;
    my ($o, $e) = ('', '');
    # qemu-img writes little; read stdout then stderr (neither fills a pipe buffer here)
    { local $/; $o = <$out> // ''; $e = <$err> // ''; }
    waitpid($pid, 0);
    return ($? >> 8, $o, $e);
}

sub qimg { return run_cmd('qemu-img', @_); }

sub qimg_ok {
    my ($rc, $o, $e) = qimg(@_);
    die "qemu-img @_ failed ($rc): $e" if $rc != 0;
    return $o;
}

sub qimg_json { return JSON::PP::decode_json(qimg_ok(@_)); }

sub qemu_io {
    my ($rc, $o, $e) = run_cmd('qemu-io', @_);
    die "qemu-io @_ failed: $e$o" if $rc != 0 || $o =~ /failed/;
    return $o;
}

# PVE::Tools::run_command's behaviour for one qemu-img command, as documented by its callers' results:
# returns (stdout lines joined, status); dies "ERRMSG: LAST_STDERR_LINE" with errmsg, else
# "command 'CMD' failed: exit code N". Earlier stderr lines (or all without errmsg) go to `stderr_out`.
sub _q {
    my ($s) = @_;
    return "''" if $s eq '';
    return $s if $s !~ m|[^\w!%+,\-./:=@^]|;
    $s =~ s/'/'\\''/g;
    return "'$s'";
}

sub pve_run {
    my ($cmd, %p) = @_;
    my ($rc, $o, $e) = run_cmd(@$cmd);
    my @err = split /\n/, $e;
    if ($p{errfunc}) { $p{errfunc}->($_) for @err; @err = (); }
    if ($rc != 0) {
        if ($p{errmsg}) {
            my $last = pop @err;
            ${ $p{stderr_out} } .= join('', map { "$_\n" } @err) if $p{stderr_out};
            die "$p{errmsg}: $last\n" if defined $last;
            die "$p{errmsg}: exit code $rc\n";
        }
        ${ $p{stderr_out} } .= join('', map { "$_\n" } @err) if $p{stderr_out};
        die "command '" . join(' ', map { _q($_) } @$cmd) . "' failed: exit code $rc\n";
    }
    ${ $p{stderr_out} } .= join('', map { "$_\n" } @err) if $p{stderr_out};
    return $o;
}

# Runs $code with STDERR sent to a file; returns (what it printed to STDERR, its result or its die).
sub capture_stderr {
    my ($code) = @_;
    my $file = scratch() . "/stderr.$$." . int(rand(1e9));
    open(my $saved, '>&', \*STDERR) or die "dup: $!";
    open(STDERR, '>', $file) or die "open: $!";
    my @r = eval { $code->() };
    my $err = $@;
    open(STDERR, '>&', $saved) or die "restore: $!";
    open(my $fh, '<', $file) or die;
    my $text = do { local $/; <$fh> } // '';
    close $fh;
    unlink $file;
    return ($text, $err, @r);
}

# True when the scalar holds an integer (IV/UV), not a floating-point number.
sub is_int_sv {
    my $f = B::svref_2object(\$_[0])->FLAGS;
    return ($f & B::SVf_IOK) && !($f & B::SVf_NOK);
}

# `qemu-img compare` says identical (exit 0).
sub same_image {
    my ($a, $b, @opts) = @_;
    my ($rc) = qimg('compare', @opts, $a, $b);
    return $rc == 0;
}

sub rss_kib {
    open(my $fh, '<', "/proc/self/status") or return 0;
    while (<$fh>) { return $1 if /^VmRSS:\s+(\d+)/; }
    return 0;
}

1;
