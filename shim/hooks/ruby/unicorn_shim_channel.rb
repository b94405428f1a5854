# The channel to unicorn-shim: one end of a socketpair the shim hands each master
# it starts (its workers inherit it), named by UNICORN_SHIM_CHANNEL=FD:INODE:PID.
# It is open only in the process the shim started (PID: `bundle exec` keeps the
# pid through its exec) and in that process's forks: a program the master or a
# worker runs sees another pid, or another file at FD, and stays silent.
# Outside the shim (no UNICORN_SHIM_CHANNEL) nothing is open and `say` does nothing.
module UnicornShimChannel
  def self.find
    fd, inode, pid = ENV["UNICORN_SHIM_CHANNEL"].to_s.split(":").map { |s| Integer(s, 10, exception: false) }
    return nil unless fd && inode && pid == Process.pid
    io = IO.for_fd(fd, autoclose: false)
    stat = io.stat
    stat.socket? && stat.ino == inode ? io : nil
  rescue StandardError
    nil
  end

  IO_ = find
  FD = IO_&.fileno
  MASTER = Process.pid            # the process the shim started

  # One line to the shim; never blocks, never raises, never disturbs the server.
  def self.say(text)
    return unless IO_
    require "socket"
    @socket ||= Socket.for_fd(FD).tap { |s| s.autoclose = false }
    @socket.sendmsg_nonblock(text.to_s.b[0, 500], Socket::MSG_NOSIGNAL, exception: false)
  rescue StandardError, ScriptError
    nil                           # the shim is gone or restarting
  end

  # In a fork of the master that is about to exec the next master (Unicorn's USR2):
  # the channel stays open across the exec (Unicorn marks every other fd
  # close-on-exec), names the new master's pid, and the shim is told.
  def self.pass_on(redirects)
    return unless IO_ && Process.ppid == MASTER
    IO_.close_on_exec = false
    redirects[FD] = FD if redirects.is_a?(Hash)
    ENV["UNICORN_SHIM_CHANNEL"] = ENV["UNICORN_SHIM_CHANNEL"].sub(/:\d+\z/, ":#{Process.pid}")
    say("exec")
  rescue StandardError
    nil
  end
end
