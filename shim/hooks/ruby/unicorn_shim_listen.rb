# Loaded by unicorn-shim into every master it starts, and so its workers (from
# rubygems/defaults/operating_system.rb). Unicorn matches the sockets it
# inherits with its config's `listen` addresses by name: the path the socket
# was bound with. The classic config's `listen APP_PATH + "/tmp/sockets/x.sock"`
# names it through the release it was read from: `current/...` when the
# config is read through `current`, `releases/r2/...` when the shim starts a
# master of the last good release. The second spelling names the same socket
# file, but Unicorn tries to bind it anew and fails ("adding listener failed
# ... (in use)"). Here a unix path that is the very socket file of an
# inherited listener (same device and inode) is spelled as that listener's
# name. Nothing else changes; without inherited sockets this does nothing.
module UnicornShimListen
  def self.inherited_unix_names
    ENV["UNICORN_FD"].to_s.split(",").map(&:to_i).uniq.filter_map do |fd|
      io = Socket.for_fd(fd)
      io.autoclose = false
      addr = io.local_address
      addr.unix? && addr.unix_path.start_with?("/") ? addr.unix_path : nil
    rescue StandardError
      nil
    end
  end

  def self.held_name(path)
    @held ||= inherited_unix_names
    @held.find { |name| File.identical?(name, path) }
  rescue StandardError
    nil
  end

  module ExpandAddr
    def expand_addr(address)
      expanded = super
      return expanded unless String === expanded && expanded.start_with?("/")
      UnicornShimListen.held_name(expanded) || expanded
    end
  end

  def self.install
    Unicorn::Configurator.prepend(ExpandAddr)
  end
end

if ENV["UNICORN_FD"]
  if defined?(Unicorn::Configurator)
    UnicornShimListen.install
  else
    # Prepended once Unicorn defines its configurator, before any config is read.
    trace = TracePoint.new(:end) do |tp|
      next unless tp.self.is_a?(Class) && Module.instance_method(:name).bind_call(tp.self) == "Unicorn::Configurator"
      trace.disable
      require "socket"
      UnicornShimListen.install
    end
    trace.enable
  end
end
